"""The device and precision policy, and bf16 against fp32 with stated tolerances.

The bf16 oracles run on any CPU: where the CPU has no native bf16 units torch emulates it (slowly, which is why
the policy never *chooses* bf16 there), and the numbers are the same. Tolerances, relative L2 error against fp32 on
tiny random models: encoder features < 1.5% (measured 0.4-0.5%), visual tokens < 3% (0.25-1.2%), logits < 5%
(1.6-2.5%) with the greedy token kept at >= 90% of positions (93-100%).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_ENCODERS, tiny_config
from PIL import Image

import fovea.loading
from fovea import VLM, runtime
from fovea.cli import main
from fovea.engine import Engine, EngineConfig, SamplingParams
from fovea.runtime import placement, resolve_device, resolve_dtype


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# ----- the policy ---------------------------------------------------------------------------------------------------
def test_auto_dtype_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: ("amx_bf16", "avx512_bf16"))
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: ())
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32


def test_bad_device_or_dtype_names_what_is_available(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: ())
    with pytest.raises(ValueError, match=r"'bfloat16' is not supported on device 'cpu'.*AMX.*supported: \['float32'\]"):
        resolve_dtype("bfloat16", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"'float16' is not supported on device 'cpu'.*GPUs"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(ValueError, match="dtype 'int8' is not known"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="device 'tpu' is not a device name"):
        resolve_device("tpu")
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=rf"device '{missing}' (is not available|does not exist).*available"):
        resolve_device(missing)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        placement("cpu", "float32", 0)


@pytest.mark.parametrize("argv", [
    ["ask", "page.png", "q?", "--device", "cuda:7"],
    ["ask", "page.png", "q?", "--dtype", "float16", "--device", "cpu"],
    ["serve", "--dtype", "float16", "--device", "cpu"],
])
def test_cli_rejects_placement_before_building_anything(argv, monkeypatch, capsys, tmp_path):
    def no_build(*a, **k):
        raise AssertionError("a model was built")

    Image.new("RGB", (64, 48), "white").save(tmp_path / "page.png")  # a real page: the placement is what is wrong
    monkeypatch.chdir(tmp_path)

    monkeypatch.setattr(VLM, "from_config", no_build)
    monkeypatch.setattr(fovea.loading, "load_model", no_build)
    if torch.cuda.is_available() and "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fovea: error:" in err and ("cuda:7" in err or "float16" in err)
    assert "available" in err or "supported" in err


# ----- bf16 against fp32 ----------------------------------------------------------------------------------------------
def _pair(encoder: str, connector: str):
    torch.manual_seed(0)
    fp32 = VLM.from_config(tiny_config(encoder, connector)).eval().reparameterize_encoder()
    bf16 = copy.deepcopy(fp32).place("cpu", torch.bfloat16)
    return fp32, bf16


def _prompt(model: VLM):
    page = Image.effect_noise((200, 140), 60).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the total?"}]}]
    return model.processor()(messages, [page])


@pytest.mark.parametrize("encoder", sorted(TINY_ENCODERS))
def test_bf16_encoder_features_within_tolerance(encoder):
    fp32, bf16 = _pair(encoder, "mlp")
    pixels = [img.pixels for img in _prompt(fp32).images]
    with torch.no_grad():
        a, b = fp32.encode(pixels)[0], bf16.encode(pixels)[0]
    assert b.dtype == torch.bfloat16
    assert rel(b, a) < 0.015, encoder


def test_encoder_recipes_follow_the_measurements():
    _, hd = _pair("fastvithd", "mlp")
    assert next(hd.encoder.parameters()).dtype == torch.bfloat16 and hd.encoder_autocast is None
    _, small = _pair("fastvit-mci0", "mlp")  # bf16 weights measured slower than fp32 here: autocast instead
    assert next(small.encoder.parameters()).dtype == torch.float32 and small.encoder_autocast == torch.bfloat16
    assert next(small.lm.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("connector", ["linear", "mlp", "avgpool", "perceiver", "qformer", "c_abstractor"])
def test_bf16_visual_tokens_and_logits_within_tolerance(connector):
    fp32, bf16 = _pair("fastvit-mci0", connector)
    prompt = _prompt(fp32)
    pixels = [img.pixels for img in prompt.images]
    with torch.no_grad():
        va, vb = fp32.visual_tokens(pixels), bf16.visual_tokens(pixels)
        la = fp32(prompt.input_ids[None], pixels).logits[0]
        lb = bf16(prompt.input_ids[None], pixels).logits[0]
    assert rel(vb, va) < 0.03, connector
    assert rel(lb, la) < 0.05, connector
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() >= 0.9


def test_bf16_engine_greedy_equals_generate_in_bf16():
    """The engine with its KV cache in the LLM's dtype equals transformers generate run in that same dtype."""
    _, model = _pair("fastvit-mci0", "qformer")
    engine = Engine(model, EngineConfig(max_batch=2, max_len=256))
    engine.eos_ids = set()
    prompt = _prompt(model)
    assert engine.cache.k[0].dtype == torch.bfloat16
    handle = engine.add_request([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                 "text": "what is the total?"}]}], [Image.effect_noise((200, 140), 60).convert("RGB")],
                                SamplingParams(max_tokens=8))
    engine.run_until_done()
    reference = copy.deepcopy(model.lm)
    reference.set_attn_implementation("sdpa")
    with torch.no_grad():
        embeds = model.embed(prompt.input_ids, model.visual_tokens([p.pixels for p in prompt.images]))
        chosen = torch.tensor(handle.tokens)
        # Teacher-forced on the engine's own tokens: each must be the reference's greedy choice, up to bf16 rounding
        # (two kernels may order a bf16 sum differently and flip a near-tie; a real error moves far more).
        stream = torch.cat([embeds, model.lm.get_input_embeddings()(chosen[:-1])])[None]  # (1,L+7,D)
        logits = reference(inputs_embeds=stream).logits[0, len(embeds) - 1:].float()  # (8,V)
    top = logits.max(-1).values
    picked = logits.gather(-1, chosen[:, None])[:, 0]
    assert len(handle.tokens) == 8
    assert handle.tokens[0] == int(logits[0].argmax())
    assert torch.all(top - picked <= 0.02 * top.abs().clamp(min=1.0)), (top - picked).tolist()


@pytest.mark.slow
def test_real_smollm2_bf16_greedy_agrees_with_fp32(smollm2_path):
    """Real weights: bf16 greedy answers to text prompts agree with fp32 on >= 80% of tokens (first divergence
    counted as the end of agreement)."""
    from fovea.config import LMConfig
    from fovea.lm import build_lm

    lm, tok = build_lm(LMConfig(name="local", path=str(smollm2_path)))
    lm.eval()
    low = copy.deepcopy(lm).to(torch.bfloat16)
    prompts = ["What is the capital of France?", "Write one sentence about invoices.", "List three colours.",
               "What is 12 times 7?", "Explain what a contract is in one line."]
    agree, total = 0, 0
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            a = lm.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
            b = low.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        agree, total = agree + same, total + len(a)
    assert agree / total >= 0.8, f"bf16 kept fp32's greedy tokens for {agree}/{total}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_engine_equals_generate():
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "qformer", lm="tiny-qwen2")).eval().reparameterize_encoder()
    model.place("cuda", torch.bfloat16)
    engine = Engine(model, EngineConfig(max_batch=2, max_len=256))
    engine.eos_ids = set()
    handle = engine.add_request([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "total?"}]}],
                                [Image.effect_noise((200, 140), 60).convert("RGB")], SamplingParams(max_tokens=8))
    engine.run_until_done()
    prompt = _prompt(model)
    reference = copy.deepcopy(model.lm)
    reference.set_attn_implementation("sdpa")
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        embeds = model.embed(prompt.input_ids.cuda(), model.visual_tokens([p.pixels for p in prompt.images]))
        out = reference.generate(inputs_embeds=embeds[None], max_new_tokens=8, do_sample=False,
                                 attention_mask=torch.ones(1, len(embeds), dtype=torch.long, device="cuda"))
    assert handle.tokens == out[0].tolist()


@pytest.mark.parametrize("encoder", ["fastvithd", "fovea-reader"])
def test_openvino_encoder_runtime_equals_torch(encoder):
    """The optional OpenVINO runtime gives the torch fp32 features (and so the same visual tokens)."""
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    torch_model = VLM.from_config(tiny_config(encoder, "qformer")).eval().reparameterize_encoder()
    ov_model = copy.deepcopy(torch_model).place("cpu", torch.float32, encoder_runtime="openvino")
    pixels = [img.pixels for img in _prompt(torch_model).images]
    with torch.no_grad():
        want, got = torch_model.encode(pixels)[0], ov_model.encode(pixels)[0]
        assert rel(got, want) < 1e-4
        assert rel(ov_model.visual_tokens(pixels), torch_model.visual_tokens(pixels)) < 1e-4
    assert len(ov_model.encoder_runner._compiled) == 1  # compiled once for this page size
    ov_model.encode(pixels)
    assert len(ov_model.encoder_runner._compiled) == 1


def test_openvino_runtime_is_cpu_only_and_named():
    model = VLM.from_config(tiny_config("fastvit-mci0", "mlp")).eval()
    with pytest.raises(ValueError, match="unknown encoder runtime 'tensorrt'"):
        model.place("cpu", torch.float32, encoder_runtime="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        model.place("cuda", torch.float32, encoder_runtime="openvino")
