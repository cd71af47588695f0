"""One contract test over every registered encoder x connector, at tiny sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ENCODERS, tiny_config
from PIL import Image

from fovea import VLM
from fovea.config import ConnectorConfig, VisionConfig
from fovea.connectors import available_connectors, build_connector
from fovea.vision import available_encoders, build_encoder

BUDGET = 8


def test_every_encoder_has_a_tiny_config():
    assert sorted(TINY_ENCODERS) == available_encoders()


def test_required_members_are_registered():
    assert {"fastvithd", "fastvit-mci0", "vit-l14-336", "vit-l14-336-anyres"} <= set(available_encoders())
    assert {"linear", "mlp", "avgpool", "perceiver", "qformer", "c_abstractor"} <= set(available_connectors())


@pytest.mark.parametrize("name", sorted(TINY_ENCODERS))
def test_encoder_contract(name):
    cfg = tiny_config(name).vision
    enc = build_encoder(cfg).eval()
    s = enc.stride
    for height, width in [(s * 2, s * 3), (s * 3, s * 1)]:
        feats = enc.features(torch.randn(2, 3, height, width))
        assert feats.shape[:2] == (2, enc.channels)
        assert feats.shape[-2:] == enc.grid(height, width)
        assert feats.shape[-1] * feats.shape[-2] == enc.num_tokens(height, width)
        assert torch.isfinite(feats).all()
    with pytest.raises(ValueError, match=rf"not a multiple of the encoder stride {s}"):
        enc.features(torch.randn(1, 3, s + 1, s))


@pytest.mark.slow  # minutes on 2 cores: CI runs the slow set after the default one
def test_real_encoder_shapes_without_running_them():
    """The full-size encoders keep their published geometry: FastViTHD stride 64 with 3072 channels."""
    fast = build_encoder(VisionConfig(name="fastvithd"))
    assert (fast.stride, fast.channels) == (64, 3072)
    assert fast.num_tokens(1024, 1024) == 256
    vit = build_encoder(VisionConfig(name="vit-l14-336"))
    assert (vit.stride, vit.channels) == (14, 1024)
    assert vit.num_tokens(336, 336) == 576
    tiled = build_encoder(VisionConfig(name="vit-l14-336-anyres"))
    assert tiled.num_tokens(672 + 336, 672) == 5 * 576  # a 672x672 canvas of four crops, then the base-view row


# Every registered connector with every encoder it can read; LLaVA-NeXT's arrangement reads AnyRes tile layouts only.
PAIRS = [(e, c) for c in available_connectors() for e in sorted(TINY_ENCODERS)
         if c != "llava_next" or e == "vit-l14-336-anyres"]


def test_pairs_cover_every_connector():
    assert {c for _, c in PAIRS} == set(available_connectors())


@pytest.mark.parametrize(("encoder", "connector"), PAIRS)
def test_vlm_contract(encoder, connector):
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config(encoder, connector, budget=BUDGET)).train()
    processor = model.processor()
    sizes = [(300, 200), (180, 420)]  # (width, height): landscape and a tall page
    tokens_seen = []
    for width, height in sizes:
        image = Image.new("RGB", (width, height), "white")
        prompt = processor([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                           [image])
        pixels, original = prompt.images[0].pixels, prompt.images[0].original_size
        (visual,) = model.image_tokens([pixels], image_sizes=[original])
        expected = model.num_visual_tokens(*pixels.shape[-2:], original)
        assert visual.shape == (expected, model.lm.config.hidden_size)
        assert int((prompt.input_ids == model.image_token_id).sum()) == expected
        tokens_seen.append(expected)
        out = model(prompt.input_ids[None], [pixels], image_sizes=[original], labels=prompt.input_ids[None])
        assert torch.isfinite(out.loss)
    if model.connector.budget is None:
        assert model.connector.num_output_tokens(3, 5) == 15
    else:  # a compressor's budget does not depend on the image size
        assert tokens_seen == [BUDGET, BUDGET]
        assert model.connector.num_output_tokens(3, 5) == model.connector.num_output_tokens(40, 7) == BUDGET
    out.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("connector."):
            assert param.grad is not None, f"trainable {name} got no gradient"
            assert torch.isfinite(param.grad).all()
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.connector.parameters())


@pytest.mark.parametrize("connector", ["avgpool", "perceiver", "qformer", "c_abstractor"])
def test_budget_independent_of_resolution_and_aspect(connector):
    cfg = ConnectorConfig(name=connector, num_queries=64, hidden_size=32, num_heads=2)
    conn = build_connector(cfg, in_channels=16, out_dim=24).eval()
    for h, w in [(16, 16), (34, 45), (3, 40), (1, 1)]:  # 1024 px page, 2880x2160 scan, a strip, one cell
        assert conn(torch.randn(1, 16, h, w)).shape == (1, 64, 24)
        assert conn.num_output_tokens(h, w) == 64


def test_non_square_budget_grid():
    cfg = ConnectorConfig(name="c_abstractor", num_queries=128, hidden_size=32)
    conn = build_connector(cfg, in_channels=16, out_dim=24)
    assert conn.grid == (8, 16)
    cfg = ConnectorConfig(name="avgpool", num_queries=12, grid=(2, 6))
    assert build_connector(cfg, in_channels=16, out_dim=24).grid == (2, 6)
    with pytest.raises(ValueError, match="grid 3x3 = 9 tokens does not match the budget 12"):
        build_connector(ConnectorConfig(name="avgpool", num_queries=12, grid=(3, 3)), in_channels=16, out_dim=24)


def test_instruction_aware_qformer_reads_the_instruction():
    cfg = ConnectorConfig(name="qformer", num_queries=4, hidden_size=32, num_heads=2, instruction_aware=True)
    conn = build_connector(cfg, in_channels=16, out_dim=24).eval()
    feats = torch.randn(2, 16, 3, 5)
    a = conn(feats, text_embeds=torch.randn(2, 6, 24))
    b = conn(feats, text_embeds=torch.randn(2, 6, 24))
    assert a.shape == (2, 4, 24) and not torch.allclose(a, b)
    # Padding the instruction and masking the padding gives the same result as the short instruction alone.
    text = torch.randn(1, 3, 24)
    short = conn(feats[:1], text_embeds=text)
    padded = conn(feats[:1], text_embeds=torch.cat([text, torch.randn(1, 2, 24)], 1),
                  text_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


def test_connector_rejects_wrong_channels():
    conn = build_connector(ConnectorConfig(name="mlp"), in_channels=16, out_dim=24)
    with pytest.raises(ValueError, match=r"expects features \(B, 16, h, w\), got \(1, 8, 2, 2\)"):
        conn(torch.randn(1, 8, 2, 2))


def test_duplicate_registration_is_an_error():
    from fovea.connectors import register_connector
    from fovea.vision import register_encoder

    with pytest.raises(ValueError, match="already registered"):
        register_connector("mlp")(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("fastvithd")(lambda *a: None)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="unknown encoder 'nope'; available: .*fastvithd"):
        build_encoder(VisionConfig(name="nope"))
    with pytest.raises(ValueError, match="unknown connector 'nope'; available: .*qformer"):
        build_connector(ConnectorConfig(name="nope"), in_channels=4, out_dim=4)
