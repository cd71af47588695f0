"""The engine's greedy tokens equal transformers' generate on each request alone, with the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from fovea import VLM
from fovea.engine import Engine, EngineConfig, QueueFull, SamplingParams, stream
from fovea.engine.cache import shared_prefix


def _request(i: int):
    sizes = [(200, 130), (64, 256), (300, 300), (90, 60), (128, 128), (256, 64)]
    texts = ["what is the total?", "read the first clause please", "x", "who signed?", "date", "number " * 6]
    images = [Image.effect_noise(sizes[i % len(sizes)], 40 + 10 * i).convert("RGB")] if i % 3 != 2 else []
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": texts[i % len(texts)]}]
    return [{"role": "user", "content": content}], images


def _reference(model: VLM, full_length: bool = False):
    """A copy of the model's LLM on transformers' own SDPA attention, for ``generate`` to compare against;
    ``full_length`` turns EOS off so every requested token is compared."""
    reference_lm = copy.deepcopy(model.lm)
    reference_lm.set_attn_implementation("sdpa")
    if full_length:
        reference_lm.generation_config.eos_token_id = None
    return reference_lm


def _reference_tokens(model: VLM, reference_lm, messages, images, max_tokens: int) -> list[int]:
    prompt = model.processor()(messages, images)
    with torch.no_grad():
        embeds = model.embed(prompt.input_ids, model.visual_tokens([p.pixels for p in prompt.images]))
        out = reference_lm.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds),
                                    dtype=torch.long), max_new_tokens=max_tokens, do_sample=False)
    return out[0].tolist()


@pytest.mark.parametrize("connector", ["mlp", "qformer"])
def test_concurrent_greedy_equals_generate_alone(connector):
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", connector, lm="tiny-qwen2")).eval()
    reference_lm = _reference(model, full_length=True)
    engine = Engine(model, EngineConfig(max_batch=4, max_len=512, step_tokens=48))
    engine.eos_ids = set()
    requests = [_request(i) for i in range(6)]
    max_tokens = [16, 9, 16, 3, 12, 16]
    handles = [engine.add_request(m, im, SamplingParams(max_tokens=n)) for (m, im), n in zip(requests, max_tokens,
                                                                                             strict=True)]
    assert len(handles) > engine.config.max_batch  # more requests than slots: some join while others decode
    engine.run_until_done()
    outputs = []
    for h, (messages, images), n in zip(handles, requests, max_tokens, strict=True):
        expected = _reference_tokens(model, reference_lm, messages, images, n)
        assert h.tokens == expected, h.id
        outputs.append(tuple(expected))
        assert h.metrics.completion_tokens == n
    assert engine.stats["steps"] > max(max_tokens)  # prefill was chunked (48-token budget) and interleaved
    assert len(set(outputs)) == len(outputs) and all(len(set(o)) > 2 for o in outputs)  # not a degenerate model


def test_text_only_smollm2_shape_matches_generate():
    from fovea.config import LMConfig, VLMConfig

    torch.manual_seed(0)
    cfg = tiny_config("fastvit-mci0", "mlp")
    cfg.lm = LMConfig(name="tiny-llama", overrides={"num_hidden_layers": 3, "initializer_range": 0.2})
    model = VLM.from_config(VLMConfig.from_dict(cfg.to_dict())).eval()
    reference_lm = _reference(model)
    engine = Engine(model, EngineConfig(max_batch=2, max_len=256, step_tokens=16))
    msgs = [[{"role": "user", "content": "hello there " * k}] for k in (1, 4, 9)]
    results = engine.generate([(m, [], SamplingParams(max_tokens=10)) for m in msgs])
    for m, r in zip(msgs, results, strict=True):
        expected = _reference_tokens(model, reference_lm, m, [], 10)
        assert r["token_ids"] == expected


def test_encoder_cache_encodes_a_page_once():
    model = VLM.from_config(tiny_config("fastvithd", "mlp")).eval()
    engine = Engine(model, EngineConfig(max_batch=2, max_len=256))
    image = Image.effect_noise((200, 150), 50).convert("RGB")
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    first = engine.add_request(msg, [image], SamplingParams(max_tokens=2))
    second = engine.add_request(msg, [image.copy()], SamplingParams(max_tokens=2))
    engine.run_until_done()
    assert first.metrics.encoder_cache_hits == 0 and first.metrics.encode_ms > 0
    assert second.metrics.encoder_cache_hits == 1 and second.metrics.encode_ms == 0
    assert first.metrics.visual_tokens == second.metrics.visual_tokens == 12


def test_concurrent_requests_for_one_page_encode_it_once():
    import threading
    import time

    model = VLM.from_config(tiny_config("fastvithd", "mlp")).eval()
    engine = Engine(model, EngineConfig(max_batch=8, max_len=256))
    calls = []
    encode = model.encode

    def slow_encode(pixels):
        calls.append(len(pixels))
        time.sleep(0.2)  # long enough that every thread arrives while the first encode runs
        return encode(pixels)

    model.encode = slow_encode
    image = Image.effect_noise((200, 150), 50).convert("RGB")
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    handles = []
    threads = [threading.Thread(target=lambda: handles.append(
        engine.add_request(msg, [image], SamplingParams(max_tokens=2)))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.run_until_done()
    assert calls == [1]  # one encode; the five others waited and hit the cache
    assert sorted(h.metrics.encoder_cache_hits for h in handles) == [0, 1, 1, 1, 1, 1]
    assert len({tuple(h.tokens) for h in handles}) == 1



def _ask(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def _image_span(handle) -> tuple[int, int]:
    """(first image position, first position after the last image) of a request's prompt."""
    where = (handle.prompt_keys >= 1 << 62).nonzero().flatten()
    return int(where[0]), int(where[-1]) + 1


def test_prefix_cache_reuses_a_page_and_equals_generate():
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "mlp", lm="tiny-qwen2")).eval()
    reference_lm = _reference(model, full_length=True)
    pages = [Image.effect_noise((200, 130), 40).convert("RGB"), Image.effect_noise((128, 128), 60).convert("RGB")]
    asks = [(0, "what is the total?"), (0, "who signed the contract, and when?"), (1, "what is the total?"),
            (0, "what is the total?")]
    engine = Engine(model, EngineConfig(max_batch=2, max_len=512, step_tokens=48))
    engine.eos_ids = set()
    handles = []
    for page, text in asks:  # one after another: each finds the earlier prompts in the cache
        handles.append(engine.add_request(_ask(text), [pages[page]], SamplingParams(max_tokens=12)))
        engine.run_until_done()
        expected = _reference_tokens(model, reference_lm, _ask(text), [pages[page]], 12)
        assert handles[-1].tokens == expected, text
    cached = [h.metrics.cached_tokens for h in handles]
    start, end = _image_span(handles[0])
    lengths = [len(h.prompt_keys) for h in handles]
    assert cached[0] == 0  # empty cache
    assert end <= cached[1] < lengths[1]  # the same page: system prompt and every visual token reused
    assert cached[2] == start  # another page: only the text before the image is shared
    assert cached[3] == lengths[3] - 1  # the same prompt again: all but the position that yields the first token
    assert len({tuple(h.tokens) for h in handles[:3]}) == 3 and handles[3].tokens == handles[0].tokens
    off = Engine(model, EngineConfig(max_batch=2, max_len=512, step_tokens=48, prefix_cache=0))
    off.eos_ids = set()
    for page, text in asks:
        off.add_request(_ask(text), [pages[page]], SamplingParams(max_tokens=12))
        off.run_until_done()
    assert off.stats["step_tokens"] - engine.stats["step_tokens"] == sum(cached)  # those positions were not computed
    engine.clear_caches()  # e.g. after a training step changed the weights: nothing old may be reused
    again = engine.add_request(_ask(asks[0][1]), [pages[0]], SamplingParams(max_tokens=12))
    engine.run_until_done()
    assert again.metrics.cached_tokens == 0 and again.metrics.encoder_cache_hits == 0


def test_next_conversation_turn_reuses_the_page_and_the_answer():
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "mlp", lm="tiny-qwen2")).eval()
    reference_lm = _reference(model, full_length=True)
    page = Image.effect_noise((200, 130), 40).convert("RGB")
    engine = Engine(model, EngineConfig(max_batch=2, max_len=512, step_tokens=64))
    engine.eos_ids = set()
    first = engine.add_request(_ask("what is the total?"), [page], SamplingParams(max_tokens=10))
    engine.run_until_done()
    messages = _ask("what is the total?") + [{"role": "assistant", "content": first.text},
                                              {"role": "user", "content": "and who signed?"}]
    second = engine.add_request(messages, [page], SamplingParams(max_tokens=10))
    engine.run_until_done()
    assert second.tokens == _reference_tokens(model, reference_lm, messages, [page], 10)
    turn1 = torch.cat([first.prompt_keys, torch.tensor(first.tokens[:-1])])  # prompt + answer, as computed
    shared = shared_prefix(second.prompt_keys, turn1)
    assert second.metrics.cached_tokens == min(shared, len(second.prompt_keys) - 1)  # all the two turns share
    assert second.metrics.cached_tokens > len(first.prompt_keys)  # the whole first prompt and some of the answer


@pytest.mark.parametrize("step_tokens", [2048, 40])
def test_requests_arriving_together_prefill_a_page_once(step_tokens):
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "mlp", lm="tiny-qwen2")).eval()
    reference_lm = _reference(model, full_length=True)
    page = Image.effect_noise((200, 130), 40).convert("RGB")
    texts = ["what is the total?", "who signed?", "date", "read clause two to me please", "x"]
    engine = Engine(model, EngineConfig(max_batch=8, max_len=512, step_tokens=step_tokens))
    engine.eos_ids = set()
    handles = [engine.add_request(_ask(t), [page], SamplingParams(max_tokens=8)) for t in texts]
    engine.run_until_done()
    _, end = _image_span(handles[0])
    cached = sorted(h.metrics.cached_tokens for h in handles)
    assert cached[0] == 0 and all(c >= end for c in cached[1:])  # one request prefilled the page, four copied it
    for h, t in zip(handles, texts, strict=True):
        assert h.tokens == _reference_tokens(model, reference_lm, _ask(t), [page], 8), t


def test_prefix_cache_copies_exact_values_and_evicts_least_recently_used():
    from fovea.engine.cache import PrefixCache, SlotKVCache

    cache = SlotKVCache(num_layers=2, num_kv_heads=2, head_dim=4, slots=3, max_len=16, dtype=torch.float32,
                        device=torch.device("cpu"))
    for layer in range(2):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    prefix = PrefixCache(capacity=20)
    a, b = torch.arange(10), torch.cat([torch.arange(6), torch.tensor([99, 98])])
    prefix.store(a, cache, slot=0)
    assert prefix.match(b)[1] == 6 and prefix.match(torch.tensor([5, 1]))[1] == 0
    assert prefix.load(b, cache, slot=2, limit=7) == 6
    for layer in range(2):  # slot 2 now starts with slot 0's first six positions, exactly
        assert torch.equal(cache.k[layer][:, 32:38], cache.k[layer][:, 0:6])
        assert torch.equal(cache.v[layer][:, 32:38], cache.v[layer][:, 0:6])
    assert prefix.load(a, cache, slot=2, limit=4) == 4  # never beyond the limit
    prefix.store(b, cache, slot=1)  # 10 + 8 positions held
    prefix.store(a, cache, slot=0)  # already held whole: nothing added, a becomes most recent
    assert prefix.held == 18 and prefix.stats["stored"] == 2
    prefix.store(torch.arange(50, 55), cache, slot=1)  # 23 > 20: the least recently used (b) goes
    assert prefix.held == 15 and prefix.match(b)[1] == 6 and prefix.stats["evicted"] == 1
    prefix.store(torch.arange(30), cache, slot=1)  # larger than the whole cache: not kept, nothing evicted
    assert prefix.held == 15
    prefix.store(torch.arange(12), cache, slot=0)  # extends a (10 positions): replaces it instead of adding to it
    assert prefix.held == 17 and len(prefix.entries) == 2 and prefix.match(torch.arange(12))[1] == 12


def test_sampling_streaming_stop_and_metrics():
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "perceiver")).eval()
    engine = Engine(model, EngineConfig(max_batch=2, max_len=256))
    engine.eos_ids = set()
    msg = [{"role": "user", "content": "hi"}]
    a = engine.generate([(msg, [], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7))])[0]
    b = engine.generate([(msg, [], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7))])[0]
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12  # a seed makes sampling reproducible
    stop = engine.tokenizer.decode(a["token_ids"][3:5])
    if stop.strip():
        c = engine.generate([(msg, [], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7,
                                                      stop=[stop]))])[0]
        assert c["finish_reason"] == "stop" and stop not in c["text"]
    engine.start()
    try:
        handle = engine.add_request(msg, [], SamplingParams(max_tokens=5))
        events = list(stream(handle, timeout=30))
    finally:
        engine.stop()
    assert events[-1].finished and events[-1].finish_reason == "length"
    m = events[-1].metrics
    assert m.completion_tokens == 5 and m.ttft_ms > 0 and m.prompt_tokens > 0 and m.decode_tokens_per_s > 0


def test_bad_requests_are_value_errors_and_the_queue_is_bounded():
    model = VLM.from_config(tiny_config("fastvithd", "mlp")).eval()
    engine = Engine(model, EngineConfig(max_batch=1, max_len=64, max_waiting=2))
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens plus max_tokens 60 exceeds the context length of 64"):
        engine.add_request(msg, [], SamplingParams(max_tokens=60))
    with pytest.raises(ValueError, match="temperature must be between 0 and 5, got 9"):
        SamplingParams(temperature=9)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1, got 0"):
        SamplingParams(max_tokens=0)
    engine.add_request(msg, [], SamplingParams(max_tokens=2))
    engine.add_request(msg, [], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        engine.add_request(msg, [], SamplingParams(max_tokens=2))
    engine.run_until_done()  # nothing accepted is lost
    assert engine.stats["requests"] == 2 and not engine.has_work()
    with pytest.raises(ValueError, match="EngineConfig.prefix_cache must be an integer >= 0, got -1"):
        Engine(model, EngineConfig(prefix_cache=-1))
    with pytest.raises(ValueError, match="EngineConfig.max_batch must be an integer >= 1, got 0"):
        Engine(model, EngineConfig(max_batch=0))


def test_abort_frees_the_slot():
    model = VLM.from_config(tiny_config("fastvithd", "mlp")).eval()
    engine = Engine(model, EngineConfig(max_batch=1, max_len=256))
    engine.eos_ids = set()
    msg = [{"role": "user", "content": "hi"}]
    long = engine.add_request(msg, [], SamplingParams(max_tokens=200))
    engine.step()
    engine.step()
    engine.abort(long)
    short = engine.add_request(msg, [], SamplingParams(max_tokens=3))
    engine.run_until_done()
    assert long.done and short.done and len(short.tokens) == 3 and engine.cache.free == [0]


@pytest.mark.slow  # minutes on 2 cores: CI runs the slow set after the default one
def test_real_smollm2_concurrent_greedy_equals_generate(smollm2_path):
    from fovea.config import LMConfig

    cfg = tiny_config("fastvit-mci0", "mlp")
    cfg.lm = LMConfig(name="local", path=str(smollm2_path))
    model = VLM.from_config(cfg).eval()
    reference_lm = _reference(model)
    engine = Engine(model, EngineConfig(max_batch=3, max_len=256, step_tokens=32))
    prompts = ["What is the capital of France?", "Write one sentence about the sea.", "List three prime numbers.",
               "Say hello."]
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    results = engine.generate([(m, [], SamplingParams(max_tokens=16)) for m in msgs])
    for m, r in zip(msgs, results, strict=True):
        assert r["token_ids"] == _reference_tokens(model, reference_lm, m, [], 16)
    assert "Paris" in results[0]["text"]  # a real model, really answering


def test_slot_cache_attention_equals_per_sequence_softmax():
    """Decode rows (one query, batched over slots) and multi-token chunks in one step equal plain causal softmax
    attention of each sequence over its own cached + new keys."""
    from fovea.engine.cache import SlotKVCache

    torch.manual_seed(0)
    heads, kv_heads, dim, max_len = 4, 2, 8, 16
    cache = SlotKVCache(num_layers=1, num_kv_heads=kv_heads, head_dim=dim, slots=6, max_len=max_len,
                        dtype=torch.float32, device=torch.device("cpu"))
    cache.k[0].normal_()
    cache.v[0].normal_()
    entries = [(3, 5, 1), (0, 0, 4), (1, 7, 1), (2, 2, 3), (5, 0, 1)]  # (slot, cached, new): decodes and chunks
    total = sum(n for _, _, n in entries)
    q, k, v = (torch.randn(1, h, total, dim) for h in (heads, kv_heads, kv_heads))
    cache.set_plan(entries)
    out = cache.attend(0, q, k, v, scale=0.3)  # (T,H,d)
    row = 0
    for slot, cached, new in entries:
        keys = cache.k[0][:, slot * max_len:slot * max_len + cached + new]  # (K,Lk,d), this step's keys written
        values = cache.v[0][:, slot * max_len:slot * max_len + cached + new]
        assert torch.equal(keys[:, cached:], k[0, :, row:row + new])
        qi = q[0, :, row:row + new]  # (H,Lq,d)
        keys, values = keys.repeat_interleave(heads // kv_heads, 0), values.repeat_interleave(heads // kv_heads, 0)
        scores = 0.3 * qi @ keys.transpose(1, 2)  # (H,Lq,Lk)
        allowed = torch.arange(cached + new)[None, :] <= torch.arange(new)[:, None] + cached
        expected = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values).transpose(0, 1)  # (Lq,H,d)
        torch.testing.assert_close(out[row:row + new], expected, atol=1e-5, rtol=1e-5)
        row += new


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_detokenizer_equals_full_decode(seed):
    """Token by token, the text equals decoding the whole sequence, including characters whose UTF-8 bytes are
    split over several tokens (the byte tokenizer spells every non-ASCII character as 2-4 tokens)."""
    from fovea.engine.detokenizer import Detokenizer
    from fovea.lm import byte_tokenizer

    tok = byte_tokenizer()
    text = "Total: 1.250,00 € — Straße ✓ 日本 " * (seed + 1)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-token characters are in play
    ids = ids[seed:]
    detok = Detokenizer(tok)
    pieces = [detok.add(t) for t in ids]
    assert detok.text == "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # a split character is held back, never shown half-made


def test_detokenizer_falls_back_to_full_decode_for_slow_tokenizers():
    from fovea.engine.detokenizer import Detokenizer

    class Slow:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    detok = Detokenizer(Slow())
    assert [detok.add(i) for i in [0, 1, 2]] == ["a", "b", "c"] and detok.text == "abc"


def test_an_instruction_aware_bridge_encodes_a_page_once_for_every_question():
    """Features are cached by content; the Q-Former reads each question: different tokens, one encode."""
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "qformer", instruction_aware=True)).eval()
    engine = Engine(model, EngineConfig(max_batch=2, max_len=256))
    calls = []
    encode = model.encode
    model.encode = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    image = Image.effect_noise((200, 150), 50).convert("RGB")
    first = engine.add_request(_ask("What is the total?"), [image], SamplingParams(max_tokens=2))
    second = engine.add_request(_ask("Who signed the contract?"), [image], SamplingParams(max_tokens=2))
    engine.run_until_done()
    assert calls == [1] and second.metrics.encoder_cache_hits == 1 and second.metrics.encode_ms == 0
    start, end = _image_span(first)
    assert not torch.equal(first.prompt_embeds[start:end], second.prompt_embeds[start:end])  # the question counts
    assert second.metrics.cached_tokens < start + 1  # nor does the prefix cache reuse the other question's tokens
