"""The inference engine: preprocess -> visual tokens (cached by image content) -> packed, chunked prefill ->
continuous-batching decode -> token stream.

A prompt that begins like an earlier one (the same system prompt, the same page) copies that prefix's keys/values
from the prefix cache and prefills only the rest.

Every step runs ONE forward over one packed stream holding a token for each decoding request plus prefill chunks
of admitted requests, up to a token budget. Requests join between steps as slots free up and leave as they finish.
The parts, one job each: ``Scheduler`` (who runs and how much), ``ModelRunner`` (the forward and sampling, over the
slot KV cache), ``EncoderCache`` (visual tokens by image content, single-flight), ``Detokenizer`` (incremental
text). ``Engine`` admits requests, drives steps and streams events.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fovea.engine.cache import PrefixCache, position_keys
from fovea.engine.config import EngineConfig
from fovea.engine.detokenizer import Detokenizer
from fovea.engine.encoder_cache import EncoderCache
from fovea.engine.request import Event, QueueFull, Request, RequestMetrics
from fovea.engine.runner import ModelRunner
from fovea.engine.sampling import SamplingParams
from fovea.engine.scheduler import Scheduler
from fovea.model import VLM

__all__ = ["Engine", "EngineConfig", "Event", "QueueFull", "Request", "RequestMetrics", "collect", "stream"]


class Engine:
    def __init__(self, model: VLM, config: EngineConfig | None = None, *, backend: str = "segments") -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.config.validate()
        self.runner = ModelRunner(self.model, self.config, backend)
        self.prefix_cache = PrefixCache(self.config.prefix_cache) if self.config.prefix_cache > 0 else None
        self.scheduler = Scheduler(self.config, self.runner.kv, self.prefix_cache)
        self.encoder_cache = EncoderCache(self.config.encoder_cache)
        self.processor = model.processor()
        self.tokenizer = model.tokenizer
        lm = model.lm
        eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
        eos = eos if eos is not None else lm.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.counter = itertools.count()
        self.stats = {"steps": 0, "step_tokens": 0, "requests": 0, "completion_tokens": 0}
        self._thread: threading.Thread | None = None
        self._stop = False

    @property
    def cache(self):
        """The slot KV cache (``fovea.engine.cache.SlotKVCache``)."""
        return self.runner.kv

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    # ----- admission: preprocess, visual tokens (cached), embed -------------------------------------------------
    @torch.inference_mode()
    def add_request(self, messages: Sequence[dict], images: Sequence[Any] = (), params: SamplingParams | None = None,
                    request_id: str | None = None, events: Any = None) -> Request:
        """Validate and prepare a request and queue it; raises ValueError on bad input, QueueFull when full.
        ``events``: where the engine thread puts the request's events (anything with ``put``; default a
        ``queue.Queue``), e.g. a sink that hands them to an asyncio loop."""
        params = params or SamplingParams()
        params.validate()
        with self.lock:
            self.scheduler.check_room()
        submitted = time.perf_counter()
        metrics = RequestMetrics()
        prompt = self.processor(messages, images)
        metrics.preprocess_ms = 1e3 * (time.perf_counter() - submitted)
        metrics.prompt_tokens = int(prompt.input_ids.shape[0])
        metrics.visual_tokens = sum(prompt.num_visual_tokens)
        if metrics.prompt_tokens + params.max_tokens > self.config.max_len:
            raise ValueError(f"prompt of {metrics.prompt_tokens} tokens plus max_tokens {params.max_tokens} exceeds "
                             f"the context length of {self.config.max_len} tokens")
        pixel_keys = self._pixel_keys(prompt)  # hashed once: the encoder cache and the prefix cache both key on it
        image_keys = self._image_keys(prompt, pixel_keys)
        visual = self._visual_tokens(prompt, pixel_keys, metrics)  # (N,D)
        embeds = self.model.embed(prompt.input_ids.to(self.model.device), visual)  # (L,D)
        keys = position_keys(prompt.input_ids, self.model.image_token_id, image_keys, prompt.num_visual_tokens)
        request = Request(id=request_id or f"req-{next(self.counter)}", prompt_embeds=embeds, prompt_keys=keys,
                          params=params, metrics=metrics, submitted=submitted,
                          detokenizer=Detokenizer(self.tokenizer),
                          events=events if events is not None else queue.Queue())
        if params.seed is not None:
            request.generator = torch.Generator().manual_seed(params.seed)
        with self.wakeup:
            self.scheduler.add(request)
            self.stats["requests"] += 1
            self.wakeup.notify()
        return request

    @staticmethod
    def _pixel_keys(prompt) -> list[str]:
        """A content hash per image: what its encoder features depend on (pixels and original size)."""
        keys = []
        for img in prompt.images:
            h = hashlib.sha256(img.pixels.numpy().tobytes())
            h.update(repr(img.original_size).encode())  # LLaVA-NeXT's token layout depends on it
            keys.append(h.hexdigest())
        return keys

    def _image_keys(self, prompt, pixel_keys: list[str]) -> list[str]:
        """A hash per image of what its visual tokens depend on: its content, and the instruction when the
        connector reads one (the prefix cache must not reuse one question's tokens for another)."""
        if not self.model.config.connector.instruction_aware:
            return pixel_keys
        return [hashlib.sha256(key.encode() + prompt.instructions[i].numpy().tobytes()).hexdigest()
                for i, key in enumerate(pixel_keys)]

    def _visual_tokens(self, prompt, pixel_keys: list[str], metrics: RequestMetrics) -> torch.Tensor:
        """(N,D) visual tokens for the prompt's images. Encoder features come through the encoder cache, keyed by
        content alone, so every question about a page (instruction-aware connectors included) encodes it once;
        the connector then runs per request."""
        model = self.model
        if not pixel_keys:
            return torch.empty(0, model.lm.config.hidden_size, device=model.device, dtype=model.lm.dtype)
        pixels = [img.pixels for img in prompt.images]
        features, metrics.encoder_cache_hits = self.encoder_features(prompt, pixel_keys, metrics)
        timings: dict[str, float] = {}
        tokens = model.image_tokens(pixels, prompt.instructions, [img.original_size for img in prompt.images],
                                    timings, features=features)
        metrics.compress_ms = 1e3 * timings["compress_s"]
        return torch.cat(tokens)

    def encoder_features(self, prompt, pixel_keys: list[str] | None = None,
                         metrics: RequestMetrics | None = None) -> tuple[list[torch.Tensor], int]:
        """The prompt's images' encoder features through the encoder cache (each page encoded once, whoever asks:
        a request, or the server's attention route), and how many came from the cache."""
        pixels = [img.pixels for img in prompt.images]

        def encode(todo: list[int]) -> list[torch.Tensor]:
            start = time.perf_counter()
            features = self.model.encode([pixels[i] for i in todo])
            if metrics is not None:
                metrics.encode_ms = 1e3 * (time.perf_counter() - start)
            return features

        return self.encoder_cache.get(pixel_keys or self._pixel_keys(prompt), encode)

    def clear_caches(self) -> None:
        """Forget every cached encode and prompt prefix: call it after changing the model's weights, since both
        caches hold what the old weights computed."""
        self.encoder_cache.clear()
        with self.lock:
            if self.prefix_cache is not None:
                self.prefix_cache = self.scheduler.prefix_cache = PrefixCache(self.config.prefix_cache)

    # ----- one step ----------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    def abort(self, request: Request) -> None:
        """Stop a request (its client went away); its slot is freed at the next step."""
        request.aborted = True
        with self.wakeup:
            self.wakeup.notify()

    @torch.inference_mode()
    def step(self) -> int:
        """Admit, run one packed forward, sample, stream. Returns the number of stream tokens processed."""
        with self.lock:
            for r in self.scheduler.aborted():
                self._finish(r, "abort")
            batch = self.scheduler.admit()
        chunks = self.scheduler.plan(batch) if batch else []
        if not chunks:
            return 0
        tokens = self.runner.run(chunks)
        sampled = [c.request for c in chunks if c.samples]
        if self.prefix_cache is not None:
            for r in sampled:
                if not r.tokens:  # its prompt is prefilled as of this step
                    self.prefix_cache.store(r.prompt_keys, self.cache, r.slot)
        now = time.perf_counter()
        with self.lock:
            for r, tok in zip(sampled, tokens, strict=True):
                self._append(r, tok, now)
            self.stats["steps"] += 1
            self.stats["step_tokens"] += sum(c.length for c in chunks)
        return sum(c.length for c in chunks)

    # ----- output: text, stop strings, events ------------------------------------------------------------------
    def _append(self, r: Request, token: int, now: float) -> None:
        if r.first_token_time is None:
            r.first_token_time = now
            r.metrics.ttft_ms = 1e3 * (now - r.submitted)
            r.metrics.prefill_ms = 1e3 * (now - (r.prefill_start or now))
        r.tokens.append(token)
        self.stats["completion_tokens"] += 1
        if token in self.eos_ids:
            self._emit(r, r.text, final_reason="stop", include_last=False)
            return
        before = len(r.text)
        r.detokenizer.add(token)
        text = r.text
        for stop in r.params.stop:
            at = text.find(stop, max(0, before - len(stop) + 1))  # a stop string ending earlier was found earlier
            if at != -1:
                self._emit(r, text[:at], final_reason="stop")
                return
        if len(r.tokens) >= r.params.max_tokens or len(r.prompt_embeds) + len(r.tokens) >= self.config.max_len:
            self._emit(r, text, final_reason="length")
            return
        self._emit(r, text, final_reason=None)

    def _emit(self, r: Request, text: str, final_reason: str | None, include_last: bool = True) -> None:
        hold = 0
        if final_reason is None:
            # hold back any tail that could still grow into a stop string (and a replacement character a slow
            # tokenizer's full decode shows for a split UTF-8 character)
            hold = max([len(s) - 1 for s in r.params.stop] + [1 if text.endswith("\ufffd") else 0])
        visible = max(r.emitted, len(text) - hold)
        delta, r.emitted = text[r.emitted:visible], visible
        ids = r.tokens[-1:] if include_last else []
        if final_reason is None:
            r.events.put(Event(r.id, delta, ids))
        else:
            self._finish(r, final_reason, delta, ids)

    def _finish(self, r: Request, reason: str, delta: str = "", ids: list[int] | None = None) -> None:
        if r.done:
            return
        r.done = True
        m = r.metrics
        m.completion_tokens = len(r.tokens) - (1 if reason == "stop" and r.tokens and r.tokens[-1] in self.eos_ids
                                               else 0)
        if r.first_token_time is not None and len(r.tokens) > 1:
            m.decode_tokens_per_s = (len(r.tokens) - 1) / max(time.perf_counter() - r.first_token_time, 1e-9)
        if r.slot is not None:
            if self.prefix_cache is not None and reason in ("stop", "length") and len(r.tokens) > 1:
                # the answer's keys/values are computed up to the last token's input (its own are not): keep them
                answer = torch.tensor(r.tokens[:-1], dtype=torch.int64)
                self.prefix_cache.store(torch.cat([r.prompt_keys, answer]), self.cache, r.slot)
            self.cache.release(r.slot)
            r.slot = None
        r.events.put(Event(r.id, delta, ids or [], finished=True, finish_reason=reason, metrics=m))

    # ----- driving it --------------------------------------------------------------------------------------
    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, requests: Sequence[tuple[Sequence[dict], Sequence[Any], SamplingParams]]) -> list[dict]:
        """Run several requests together to completion (no background thread): text, token ids, metrics each."""
        handles = [self.add_request(m, i, p) for m, i, p in requests]
        self.run_until_done()
        return [collect(h) for h in handles]

    def start(self) -> None:
        """Run steps on a background thread whenever there is work (for the server and streaming)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="fovea-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self._stop = True
            self.wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not self._stop and not self.has_work():
                    self.wakeup.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                self.step()
            except Exception as err:  # a failing step must not leave clients waiting forever
                self._fail_all(err)

    def _fail_all(self, err: Exception) -> None:
        with self.lock:
            for r in list(self.scheduler.running) + list(self.scheduler.waiting):
                r.events.put(Event(r.id, "", [], finished=True, finish_reason=f"error: {err}", metrics=r.metrics))
                r.done = True
                if r.slot is not None:
                    self.cache.release(r.slot)
            self.scheduler.admit()


def stream(request: Request, timeout: float | None = None) -> Iterator[Event]:
    """Events of a request as they come (the engine must be stepping: ``Engine.start`` or another thread)."""
    while True:
        event = request.events.get(timeout=timeout)
        yield event
        if event.finished:
            return


def collect(request: Request) -> dict[str, Any]:
    text, ids, reason, metrics = "", [], None, None
    while not request.events.empty():
        e = request.events.get()
        text += e.text
        ids += e.token_ids
        if e.finished:
            reason, metrics = e.finish_reason, e.metrics
    return {"id": request.id, "text": text, "token_ids": request.tokens, "finish_reason": reason,
            "metrics": metrics}
