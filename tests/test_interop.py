"""Checkpoints written by transformers load into fovea and give transformers' numbers: logits within 1e-4 in fp32
and the same 16 greedy tokens through fovea's engine. Tiny random models, built and saved in the test."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from conftest import LM_INIT, TINY_ENCODERS
from PIL import Image

from fovea import VLM, load_model, save_model
from fovea.engine import Engine, EngineConfig, SamplingParams
from fovea.lm.tokenizer import byte_tokenizer

IMAGE_TOKEN_ID = 259  # the byte tokenizer has 259 tokens; "<image>" comes next
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, initializer_range=LM_INIT, max_position_embeddings=512)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, patch_size=14, projection_dim=32)
PAGE = Image.effect_noise((90, 60), 60).convert("RGB").resize((90, 60))
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the total due?"}]}]


def _tokenizer():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return tok


def _save(model, path, *, card: str | None = None):
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    if card:
        (path / "README.md").write_text(card)
    return path


def _llava(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config={**CLIP, "image_size": 56}, text_config={"model_type": "llama", **TEXT},
                      image_token_index=IMAGE_TOKEN_ID)
    model = LlavaForConditionalGeneration(cfg)
    return model.eval(), _save(model, tmp_path / "llava")


def _llava_next(tmp_path):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config={**CLIP, "image_size": 28}, text_config={"model_type": "llama", **TEXT},
                          image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    model = LlavaNextForConditionalGeneration(cfg)
    return model.eval(), _save(model, tmp_path / "llava_next", card="---\nlicense: llama2\n---\n# tiny\n")


def _fastvlm(tmp_path):
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    torch.manual_seed(0)
    args = {**TINY_ENCODERS["fastvithd"], "inference_mode": True}
    channels = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, **args).num_features
    cfg = FastVlmConfig(
        vision_config={"model_type": "timm_wrapper", "architecture": "fastvit_mci3", "do_pooling": False,
                       "hidden_size": channels, "model_args": args},
        text_config={"model_type": "qwen2", **TEXT}, image_token_index=IMAGE_TOKEN_ID,
    )
    model = FastVlmForConditionalGeneration(cfg)
    return model.eval(), _save(model, tmp_path / "fastvlm", card="---\nlicense: other\nlicense_name: apple-amlr\n---")


def _llava_next_views(model: VLM, prompt):
    """transformers' LLaVA-NeXT input from fovea's: the base view, then the crops in raster order."""
    pixels = prompt.images[0].pixels  # (3,(rows+1)*t,cols*t): canvas, then the base-view row
    t = model.encoder.tile
    base = pixels[None, :, -t:, :t]  # (1,3,t,t)
    canvas = pixels[:, :-t]
    crops = canvas.unfold(1, t, t).unfold(2, t, t).permute(1, 2, 0, 3, 4).reshape(-1, 3, t, t)  # (n,3,t,t)
    sizes = torch.tensor([prompt.images[0].original_size])
    return {"pixel_values": torch.cat([base, crops])[None], "image_sizes": sizes}


BUILDERS = {"llava": _llava, "llava_next": _llava_next, "fast_vlm": _fastvlm}


def _peer_inputs(kind, model, prompt):
    if kind == "llava_next":
        return _llava_next_views(model, prompt)
    return {"pixel_values": prompt.images[0].pixels[None]}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_checkpoint_parity_logits_and_engine(kind, tmp_path):
    peer, path = BUILDERS[kind](tmp_path)
    model = load_model(path).eval()
    prompt = model.processor()(MESSAGES, [PAGE])
    assert prompt.num_visual_tokens[0] > 0
    extra = _peer_inputs(kind, model, prompt)
    with torch.no_grad():
        ours = model(prompt.input_ids[None], [i.pixels for i in prompt.images],
                     image_sizes=[i.original_size for i in prompt.images]).logits
        theirs = peer(input_ids=prompt.input_ids[None], **extra).logits  # raises if the image-token count differs
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4

    peer.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = peer.generate(input_ids=prompt.input_ids[None], **extra, max_new_tokens=16, do_sample=False)
    expected = expected[0, prompt.input_ids.shape[0]:].tolist()
    engine = Engine(model, EngineConfig(max_batch=2, max_len=512, step_tokens=64))
    engine.eos_ids = set()
    (result,) = engine.generate([(MESSAGES, [PAGE], SamplingParams(max_tokens=16))])
    assert result["token_ids"] == expected and len(expected) == 16


def test_llava_next_layout_unpads_and_adds_newlines(tmp_path):
    _, path = _llava_next(tmp_path)
    model = load_model(path)
    # A 60x90 (h x w) page keeps most of its pixels on the 56x56 pinpoint: 2x2 crops of 2x2 cells each.
    prompt = model.processor()(MESSAGES, [PAGE])
    assert tuple(prompt.images[0].pixels.shape[-2:]) == (56 + 28, 56)  # the canvas, then the base-view row
    # Base view: 2x2 = 4 tokens. Crops stitched to 4x4 cells; the content fills int(60 * 4/90) = 2 rows of 4 (one
    # padding row above and below is removed), and each row is closed by a newline: 2 * (4 + 1) = 10.
    assert prompt.num_visual_tokens == [4 + 10]
    # Padding is centred, as the unpadding assumes: the first and last rows are the pad value.
    pixels, pad = prompt.images[0].pixels, model.config.preprocess.pad_value
    assert torch.allclose(pixels[:, 0] * torch.tensor(model.config.preprocess.std)[:, None]
                          + torch.tensor(model.config.preprocess.mean)[:, None], torch.full((3, 56), pad), atol=1e-5)


def test_converted_directory_round_trips_and_prints_licence(tmp_path, caplog):
    _, path = _llava_next(tmp_path)
    with caplog.at_level("WARNING", logger="fovea.checkpoint"):
        model = load_model(path)
    assert "llama2" in caplog.text
    caplog.clear()
    assert model.config.license == "llama2"
    out = tmp_path / "fovea"
    save_model(model, out)
    with caplog.at_level("WARNING", logger="fovea.checkpoint"):
        again = load_model(out)
    assert "llama2" in caplog.text
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert again.config.preprocess == model.config.preprocess


def test_fastvlm_licence_name(tmp_path):
    _, path = _fastvlm(tmp_path)
    assert load_model(path).config.license == "other (apple-amlr)"


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_mismatched_and_truncated_checkpoints_name_the_problem(tmp_path):
    _, path = _llava(tmp_path)
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    _rewrite_weights(missing, lambda s: s.pop(next(k for k in s if k.endswith("multi_modal_projector.linear_2.bias"))))
    with pytest.raises(ValueError, match=r"missing keys \['connector.fc2.bias'\]"):
        load_model(missing)

    extra = tmp_path / "extra"
    shutil.copytree(path, extra)
    _rewrite_weights(extra, lambda s: s.update({"something_else.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys \['something_else.weight'\]"):
        load_model(extra)

    shape = tmp_path / "shape"
    shutil.copytree(path, shape)
    config = json.loads((shape / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatches \['lm.model.layers.0.mlp.down_proj.weight"):
        load_model(shape)

    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_model(truncated)

    unknown = tmp_path / "unknown"
    shutil.copytree(path, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "idefics3"
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'idefics3' checkpoint; fovea converts"):
        load_model(unknown)


def _assert_same_logits(model: VLM, peer) -> None:
    """fovea's logits equal a single-view peer's (LLaVA, FastVLM) on the page, given the same pixels."""
    prompt = model.processor()(MESSAGES, [PAGE])
    with torch.no_grad():
        ours = model(prompt.input_ids[None], [prompt.images[0].pixels]).logits
        theirs = peer(input_ids=prompt.input_ids[None], pixel_values=prompt.images[0].pixels[None]).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_current_key_layout_loads_too(tmp_path):
    """Published LLaVA checkpoints use the older key layout (what transformers writes); the in-memory one
    (``model.language_model.``...) is read as well."""
    from safetensors.torch import save_file

    peer, path = _llava(tmp_path)
    state = {k: v.contiguous() for k, v in peer.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    _assert_same_logits(load_model(path).eval(), peer)


def test_fovea_convert_cli(tmp_path, capsys):
    from fovea.cli import main

    _, path = _fastvlm(tmp_path)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "encoder:    fastvithd" in out and "licence:    other (apple-amlr)" in out
    assert main(["info", str(tmp_path / "out")]) == 0
    assert "licence:    other (apple-amlr)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) != 0
    assert "has no config.json" in capsys.readouterr().err


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    peer, _ = _llava(tmp_path)
    path = tmp_path / "sharded"
    peer.save_pretrained(path, max_shard_size="100KB")
    _tokenizer().save_pretrained(path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    _assert_same_logits(load_model(path).eval(), peer)
    shards[-1].unlink()
    with pytest.raises(ValueError, match=f"incomplete: shard files \\['{shards[-1].name}'\\] are missing"):
        load_model(path)


def test_llava_preprocessing_follows_the_saved_clip_processor(tmp_path):
    from transformers import CLIPImageProcessorPil

    peer, path = _llava(tmp_path)
    CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(path)
    model = load_model(path).eval()
    assert model.config.preprocess.center_crop
    for image in (PAGE, PAGE.transpose(Image.Transpose.ROTATE_90), Image.effect_noise((300, 301), 30).convert("RGB")):
        ours = model.processor()(MESSAGES, [image])
        theirs = CLIPImageProcessorPil.from_pretrained(path)(images=image, return_tensors="pt")["pixel_values"]
        assert ours.images[0].pixels.shape == theirs.shape[1:]
        assert (ours.images[0].pixels - theirs[0]).abs().max().item() < 1e-5  # same pixels from the raw image
        with torch.no_grad():
            a = model(ours.input_ids[None], [ours.images[0].pixels]).logits
            b = peer(input_ids=ours.input_ids[None], pixel_values=theirs).logits
        assert (a - b).abs().max().item() < 1e-4
    (path / "preprocessor_config.json").write_text(json.dumps({"do_center_crop": False}))
    padded = load_model(path)
    assert padded.config.preprocess.square and not padded.config.preprocess.center_crop


def test_llava_next_raw_image_parity_with_its_processor(tmp_path):
    from transformers import LlavaNextImageProcessorPil

    peer, path = _llava_next(tmp_path)
    LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                               image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]).save_pretrained(path)
    model = load_model(path).eval()
    hf = LlavaNextImageProcessorPil.from_pretrained(path)
    for image in (PAGE, PAGE.transpose(Image.Transpose.ROTATE_90), Image.effect_noise((41, 95), 30).convert("RGB")):
        prompt = model.processor()(MESSAGES, [image])
        theirs = hf(images=image, return_tensors="pt")
        views = _llava_next_views(model, prompt)["pixel_values"]
        assert views.shape == theirs["pixel_values"].shape
        assert (views - theirs["pixel_values"]).abs().max().item() < 1e-5  # base view and crops, from the raw image
        with torch.no_grad():
            ours = model(prompt.input_ids[None], [prompt.images[0].pixels],
                         image_sizes=[prompt.images[0].original_size]).logits
            ref = peer(input_ids=prompt.input_ids[None], pixel_values=theirs["pixel_values"],
                       image_sizes=theirs["image_sizes"]).logits
        assert (ours - ref).abs().max().item() < 1e-4
