"""VLM assembly: placeholder expansion, the merge check, freezing, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from fovea import VLM, load_model, save_model
from fovea.lm import byte_tokenizer
from fovea.merge import merge_visual_tokens


def _messages(n_images: int = 1, text: str = "what is written?"):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def test_byte_tokenizer_round_trips_text():
    tok = byte_tokenizer()
    text = "Pay EUR 1,250.00 — naïve café ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    templated = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert templated == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_placeholders_expand_to_the_models_count():
    model = VLM.from_config(tiny_config("fastvithd", "mlp"))
    images = [Image.new("RGB", (320, 128)), Image.new("RGB", (64, 256))]
    prompt = model.processor()(_messages(2), images)
    assert prompt.num_visual_tokens == [model.num_visual_tokens(*i.pixels.shape[-2:]) for i in prompt.images]
    assert prompt.num_visual_tokens == [4 * 2, 1 * 4]  # 256x102->128 px grid of 64 px cells; 256x64
    assert int((prompt.input_ids == model.image_token_id).sum()) == sum(prompt.num_visual_tokens)
    logits = model(prompt.input_ids[None], [i.pixels for i in prompt.images]).logits
    assert logits.shape == (1, len(prompt.input_ids), model.lm.config.vocab_size)


def test_processor_errors():
    proc = VLM.from_config(tiny_config()).processor()
    with pytest.raises(ValueError, match="messages hold 2 image placeholders but 1 images given"):
        proc(_messages(2), [Image.new("RGB", (64, 64))])
    with pytest.raises(ValueError, match="messages is empty"):
        proc([], [])
    with pytest.raises(ValueError, match="unsupported message part"):
        proc([{"role": "user", "content": [{"type": "audio"}]}], [])


def test_merge_count_mismatch_names_both_numbers():
    ids = torch.tensor([[1, 9, 9, 9, 2]])
    embeds = torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match="prompt has 3 image placeholder tokens but the images produced 2 visual"):
        merge_visual_tokens(embeds, ids, 9, torch.ones(2, 4))
    merged = merge_visual_tokens(embeds, ids, 9, torch.arange(12.0).view(3, 4))
    assert torch.equal(merged[0, 1:4], torch.arange(12.0).view(3, 4)) and merged[0, 0].abs().sum() == 0


def test_images_of_different_sizes_are_not_padded():
    """Per-image results in a mixed batch equal each image encoded alone: no image was padded to another."""
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("vit-l14-336", "perceiver")).eval()
    pixels = [torch.randn(3, 28, 56), torch.randn(3, 42, 28), torch.randn(3, 28, 56)]
    together = model.compress(model.encode(pixels))
    for p, t in zip(pixels, together, strict=True):
        alone = model.compress(model.encode([p]))[0]
        torch.testing.assert_close(t, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags", [dict(freeze_vision=False, freeze_connector=True, freeze_lm=True),
                                   dict(freeze_vision=True, freeze_connector=False, freeze_lm=False)])
def test_freeze_flags(flags):
    cfg = tiny_config("fastvit-mci0", "avgpool")
    for key, value in flags.items():
        setattr(cfg, key, value)
    model = VLM.from_config(cfg).train()
    for part, frozen in (("encoder", flags["freeze_vision"]), ("connector", flags["freeze_connector"]),
                         ("lm", flags["freeze_lm"])):
        module = getattr(model, part)
        assert all(p.requires_grad != frozen for p in module.parameters()), part
        assert module.training != frozen, f"{part} should be in {'eval' if frozen else 'train'} mode"
    expected = sum(p.numel() for part, f in (("encoder", "freeze_vision"), ("connector", "freeze_connector"),
                                              ("lm", "freeze_lm")) if not flags[f]
                   for p in getattr(model, part).parameters())
    assert model.num_trainable_parameters() == expected


@pytest.mark.parametrize("lm", ["tiny-llama", "tiny-qwen2"])
def test_save_load_round_trip_is_exact(tmp_path, lm):
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "qformer", lm=lm, instruction_aware=True)).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompt = model.processor()(_messages(1), [Image.new("RGB", (200, 130), "gray")])
    args = (prompt.input_ids[None], [i.pixels for i in prompt.images], prompt.instructions)
    assert torch.equal(model(*args).logits, loaded(*args).logits)
    assert loaded.processor()(_messages(1), [Image.new("RGB", (200, 130))]).input_ids.tolist() == \
        prompt.input_ids.tolist()


def test_loading_a_mismatched_checkpoint_names_the_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(VLM.from_config(tiny_config("fastvithd", "mlp")), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state.pop("connector.fc2.bias")
    state["connector.extra"] = torch.zeros(1)
    save_file(state, str(weights))
    expected = r"missing keys \['connector.fc2.bias'\].*unexpected keys \['connector.extra'\]"
    with pytest.raises(ValueError, match=expected):
        load_model(tmp_path / "m")
    with pytest.raises(ValueError, match="is not a model directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("encoder", ["fastvithd", "fastvit-mci0"])
def test_reparameterized_encoder_gives_the_same_features_and_reloads(tmp_path, encoder):
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config(encoder, "mlp")).eval()
    for m in model.encoder.modules():  # non-trivial BatchNorm statistics, so fusing has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    pixels = torch.randn(1, 3, 128, 192)
    before = model.encoder.features(pixels)
    n_before = sum(1 for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    model.reparameterize_encoder()
    after = model.encoder.features(pixels)
    assert sum(1 for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)) < n_before
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)
    save_model(model, tmp_path / "fused")
    loaded = load_model(tmp_path / "fused").eval()
    torch.testing.assert_close(loaded.encoder.features(pixels), after, atol=0, rtol=0)


@pytest.mark.parametrize("connector", ["qformer", "perceiver", "mlp", "c_abstractor"])
def test_attention_maps_say_where_the_queries_looked(connector):
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", connector, instruction_aware=connector == "qformer")).eval()
    prompt = model.processor()([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "total?"}]}],
                               [Image.effect_noise((300, 200), 40).convert("RGB")])
    pixels = [img.pixels for img in prompt.images]
    (found,) = model.attention_maps(pixels, prompt.instructions)
    if connector in ("mlp", "c_abstractor"):  # no queries: every cell is read once
        assert found is None
        return
    assert found.shape == model.encoder.grid(*pixels[0].shape[-2:])
    assert (found >= 0).all() and abs(float(found.sum()) - 1) < 1e-5
    if connector == "qformer":  # an instruction-aware Q-Former looks differently for another question
        question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "who signed the lease?"}]}]
        other = model.processor()(question, [Image.effect_noise((300, 200), 40).convert("RGB")])
        (again,) = model.attention_maps(pixels, other.instructions)
        assert not torch.allclose(found, again)
