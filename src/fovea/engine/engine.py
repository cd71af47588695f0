"""The inference engine: preprocess -> encode (cached by image content) -> compress -> packed, chunked prefill ->
continuous-batching decode -> token stream.

A prompt that begins like an earlier one (the same system prompt, the same page) copies that prefix's keys/values
from the prefix cache and prefills only the rest.

Every step runs ONE forward over one packed stream holding a token for each decoding request plus prefill chunks
of admitted requests, up to a token budget. Requests join between steps as slots free up and leave as they finish.
The LLM is the unmodified transformers decoder; fovea's slot KV cache reaches its attention through a keyword
argument (``fovea_cache``), the way transformers' own continuous batching passes its paged cache.

Notation: T stream tokens in a step, D LLM width, N sequences sampled in a step, V vocabulary, L prompt tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fovea.attention import use_backend
from fovea.engine.cache import PrefixCache, SlotKVCache, position_keys, shared_prefix
from fovea.engine.sampling import SamplingParams, sample
from fovea.model import VLM, image_layouts

# A request waits for another's prefill only when it would reuse at least this many more positions than the cache
# holds now: waiting costs it a step of TTFT.
MIN_SHARED_PREFIX = 16


@dataclass
class EngineConfig:
    max_batch: int = 16  # requests decoding at once (KV cache slots)
    max_len: int = 2048  # positions per request (prompt + answer); the context limit requests are checked against
    step_tokens: int = 1024  # token budget of one step's packed stream (decode tokens + prefill chunks)
    max_waiting: int = 64  # requests queued beyond the running ones; more raise QueueFull
    encoder_cache: int = 32  # images whose visual tokens are kept, keyed by content hash (LRU)
    prefix_cache: int = 8192  # prompt positions whose keys/values are kept for prompts that begin the same way (0: off)

    def validate(self) -> None:
        """A ValueError naming the field, its value and the bound, for any size out of range."""
        for name, least in (("max_batch", 1), ("max_len", 1), ("step_tokens", 1), ("max_waiting", 0),
                            ("encoder_cache", 0), ("prefix_cache", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"EngineConfig.{name} must be an integer >= {least}, got {value!r}")


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound; try again later."""


@dataclass
class RequestMetrics:
    visual_tokens: int = 0  # visual tokens sent to the LLM
    prompt_tokens: int = 0  # all prompt tokens (visual included)
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache (not prefilled)
    completion_tokens: int = 0  # tokens generated
    preprocess_ms: float = 0.0  # image decode/resize + chat template
    encode_ms: float = 0.0  # vision encoder (0 when every image came from the encoder cache)
    compress_ms: float = 0.0  # connector
    prefill_ms: float = 0.0  # from first scheduled prefill chunk to the first token
    ttft_ms: float = 0.0  # from submission to the first token
    decode_tokens_per_s: float = 0.0  # completion tokens after the first, per second
    encoder_cache_hits: int = 0  # images served from the encoder cache

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class Event:
    request_id: str
    text: str  # new text since the previous event
    token_ids: list[int]  # new token ids
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    metrics: RequestMetrics | None = None  # set on the final event


@dataclass
class Request:
    id: str
    prompt_embeds: torch.Tensor  # (L,D)
    prompt_keys: torch.Tensor  # (L,) what sits at each position (token id or image content), for the prefix cache
    params: SamplingParams
    metrics: RequestMetrics
    submitted: float
    events: queue.Queue = field(default_factory=queue.Queue)
    generator: torch.Generator | None = None
    slot: int | None = None
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already sent
    prefill_start: float | None = None
    first_token_time: float | None = None
    aborted: bool = False
    done: bool = False


@dataclass
class _Pending:
    """An image one request is encoding; others asking for it wait on ``done``."""

    done: threading.Event = field(default_factory=threading.Event)
    tokens: torch.Tensor | None = None
    error: BaseException | None = None


class Engine:
    def __init__(self, model: VLM, config: EngineConfig | None = None, *, backend: str = "segments") -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.config.validate()
        lm = model.lm
        use_backend(lm, backend)
        lm_cfg = lm.config
        head_dim = getattr(lm_cfg, "head_dim", None) or lm_cfg.hidden_size // lm_cfg.num_attention_heads
        limit = getattr(lm_cfg, "max_position_embeddings", self.config.max_len)
        if self.config.max_len > limit:
            raise ValueError(f"engine max_len {self.config.max_len} exceeds the LLM's {limit} positions")
        self.cache = SlotKVCache(
            num_layers=lm_cfg.num_hidden_layers, num_kv_heads=lm_cfg.num_key_value_heads, head_dim=head_dim,
            slots=self.config.max_batch, max_len=self.config.max_len, dtype=lm.dtype, device=model.device,
        )
        self.processor = model.processor()
        self.tokenizer = model.tokenizer
        eos = lm.generation_config.eos_token_id if lm.generation_config is not None else None
        eos = eos if eos is not None else lm_cfg.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.lock = threading.Lock()
        self.encode_lock = threading.Lock()  # guards the encoder cache and the in-flight encodes (never held to encode)
        self.in_flight: dict[str, _Pending] = {}  # images some request is encoding now, by content key
        self.wakeup = threading.Condition(self.lock)
        self.encoder_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.prefix_cache = PrefixCache(self.config.prefix_cache) if self.config.prefix_cache > 0 else None
        self.counter = itertools.count()
        self.stats = {"steps": 0, "step_tokens": 0, "requests": 0, "completion_tokens": 0}
        self._thread: threading.Thread | None = None
        self._stop = False

    # ----- admission: preprocess, encode (cached), compress, embed -----------------------------------------
    @torch.inference_mode()
    def add_request(self, messages: Sequence[dict], images: Sequence[Any] = (), params: SamplingParams | None = None,
                    request_id: str | None = None, events: Any = None) -> Request:
        """Validate and prepare a request and queue it; raises ValueError on bad input, QueueFull when full.
        ``events``: where the engine thread puts the request's events (anything with ``put``; default a
        ``queue.Queue``), e.g. a sink that hands them to an asyncio loop."""
        params = params or SamplingParams()
        params.validate()
        with self.lock:
            if len(self.waiting) >= self.config.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the limit is {self.config.max_waiting}")
        submitted = time.perf_counter()
        metrics = RequestMetrics()
        t0 = time.perf_counter()
        prompt = self.processor(messages, images)
        t1 = time.perf_counter()
        metrics.preprocess_ms = 1e3 * (t1 - t0)
        metrics.prompt_tokens = int(prompt.input_ids.shape[0])
        metrics.visual_tokens = sum(prompt.num_visual_tokens)
        if metrics.prompt_tokens + params.max_tokens > self.config.max_len:
            raise ValueError(f"prompt of {metrics.prompt_tokens} tokens plus max_tokens {params.max_tokens} exceeds "
                             f"the context length of {self.config.max_len} tokens")
        image_keys = self._image_keys(prompt)
        visual = self._visual_tokens(prompt, image_keys, metrics)
        embeds = self.model.embed(prompt.input_ids.to(self.model.device), visual)  # (L,D)
        keys = position_keys(prompt.input_ids, self.model.image_token_id, image_keys, prompt.num_visual_tokens)
        request = Request(id=request_id or f"req-{next(self.counter)}", prompt_embeds=embeds, prompt_keys=keys,
                          params=params, metrics=metrics, submitted=submitted,
                          events=events if events is not None else queue.Queue())
        if params.seed is not None:
            request.generator = torch.Generator().manual_seed(params.seed)
        with self.wakeup:
            if len(self.waiting) >= self.config.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the limit is {self.config.max_waiting}")
            self.waiting.append(request)
            self.stats["requests"] += 1
            self.wakeup.notify()
        return request

    def _image_keys(self, prompt) -> list[str]:
        """A content hash per image: what its visual tokens depend on (pixels, original size, instruction)."""
        aware = self.model.config.connector.instruction_aware
        keys = []
        for i, img in enumerate(prompt.images):
            h = hashlib.sha256(img.pixels.numpy().tobytes())
            h.update(repr(img.original_size).encode())  # LLaVA-NeXT's token layout depends on it
            if aware:
                h.update(prompt.instructions[i].numpy().tobytes())
            keys.append(h.hexdigest())
        return keys

    def _visual_tokens(self, prompt, keys: list[str], metrics: RequestMetrics) -> torch.Tensor:
        """(N,D) visual tokens for the prompt's images; an image seen before (same pixels, same instruction) is
        not encoded again, and an image another request is encoding right now is waited for, not encoded twice.
        Different images still encode in parallel on their request threads."""
        model = self.model
        aware = model.config.connector.instruction_aware
        mine: dict[str, _Pending] = {}  # keys this request encodes
        waits: dict[str, _Pending] = {}  # keys another request is encoding
        todo: list[int] = []
        results: dict[str, torch.Tensor] = {}
        with self.encode_lock:
            for i, key in enumerate(keys):
                if key in self.encoder_cache:
                    results[key] = self.encoder_cache[key]  # held here: a later eviction cannot take it away
                    continue
                if key in mine or key in waits:
                    continue
                if key in self.in_flight and self.config.encoder_cache > 0:  # cache off: no reuse of any kind
                    waits[key] = self.in_flight[key]
                else:
                    mine[key] = _Pending()
                    self.in_flight.setdefault(key, mine[key])
                    todo.append(i)
        metrics.encoder_cache_hits = len(keys) - len(todo)
        if todo:
            try:
                t0 = time.perf_counter()
                pixels = [prompt.images[i].pixels for i in todo]
                feats = model.encode(pixels)
                t1 = time.perf_counter()
                layouts = image_layouts(pixels, [prompt.images[i].original_size for i in todo])
                tokens = model.compress(feats, [prompt.instructions[i] for i in todo] if aware else None, layouts)
                t2 = time.perf_counter()
            except BaseException as err:
                with self.encode_lock:
                    for key, pending in mine.items():
                        pending.error = err
                        pending.done.set()
                        if self.in_flight.get(key) is pending:
                            del self.in_flight[key]
                raise
            metrics.encode_ms, metrics.compress_ms = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
            with self.encode_lock:
                for i, tok in zip(todo, tokens, strict=True):
                    results[keys[i]] = tok
                    self.encoder_cache[keys[i]] = tok
                    mine[keys[i]].tokens = tok
                    mine[keys[i]].done.set()
                    if self.in_flight.get(keys[i]) is mine[keys[i]]:
                        del self.in_flight[keys[i]]
        for key, pending in waits.items():
            pending.done.wait()
            if pending.error is not None:
                raise ValueError(f"encoding this image failed in a concurrent request: {pending.error}")
            results[key] = pending.tokens
        with self.encode_lock:
            for key in keys:
                if key in self.encoder_cache:
                    self.encoder_cache.move_to_end(key)
            while len(self.encoder_cache) > self.config.encoder_cache:
                self.encoder_cache.popitem(last=False)
        if not keys:
            return torch.empty(0, model.lm.config.hidden_size, device=model.device, dtype=model.lm.dtype)
        return torch.cat([results[key] for key in keys])

    def clear_caches(self) -> None:
        """Forget every cached encode and prompt prefix: call it after changing the model's weights, since both
        caches hold what the old weights computed."""
        with self.encode_lock:
            self.encoder_cache.clear()
        with self.lock:
            if self.prefix_cache is not None:
                self.prefix_cache = PrefixCache(self.config.prefix_cache)

    # ----- one step ----------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request: Request) -> None:
        """Stop a request (its client went away); its slot is freed at the next step."""
        request.aborted = True
        with self.wakeup:
            self.wakeup.notify()

    @torch.inference_mode()
    def step(self) -> int:
        """Admit, run one packed forward, sample, stream. Returns the number of stream tokens processed."""
        with self.lock:
            for r in [r for r in self.running if r.aborted] + [r for r in self.waiting if r.aborted]:
                self._finish(r, "abort")
            self.waiting = deque(r for r in self.waiting if not r.done)
            self.running = [r for r in self.running if not r.done]
            while self.waiting and self.cache.free:
                r = self.waiting.popleft()
                r.slot = self.cache.allocate()
                self.running.append(r)
            batch = list(self.running)
        if not batch:
            return 0
        budget = self.config.step_tokens
        entries, pieces, positions, sample_rows, sampled_reqs = [], [], [], [], []
        embed = self.model.lm.get_input_embeddings()
        cursor = 0
        for r in batch:  # decoding requests first: one token each, they never wait behind a long prefill
            if r.prefilled == len(r.prompt_embeds) and r.tokens:
                cached = len(r.prompt_embeds) + len(r.tokens) - 1
                entries.append((r.slot, cached, 1))
                pieces.append(embed(torch.tensor([r.tokens[-1]], device=self.model.device)))
                positions.append(torch.tensor([cached]))
                cursor += 1
                sample_rows.append(cursor - 1)
                sampled_reqs.append(r)
                budget -= 1
        for r in batch:  # then prefill chunks, as far as the budget goes
            if len(r.prompt_embeds) == r.prefilled or budget <= 0:
                continue
            if r.prefill_start is None:
                if self.prefix_cache is not None and not self._start_from_cache(r, batch):
                    continue
                r.prefill_start = time.perf_counter()
            n = min(len(r.prompt_embeds) - r.prefilled, budget)
            entries.append((r.slot, r.prefilled, n))
            pieces.append(r.prompt_embeds[r.prefilled:r.prefilled + n])
            positions.append(torch.arange(r.prefilled, r.prefilled + n))
            cursor += n
            budget -= n
            r.prefilled += n
            if r.prefilled == len(r.prompt_embeds):
                sample_rows.append(cursor - 1)
                sampled_reqs.append(r)
        if not entries:
            return 0
        self.cache.set_plan(entries)
        stream = torch.cat(pieces)[None]  # (1,T,D)
        position_ids = torch.cat(positions)[None].to(self.model.device)  # (1,T)
        hidden = self.model.lm.model(inputs_embeds=stream, position_ids=position_ids, use_cache=False,
                                     fovea_cache=self.cache).last_hidden_state  # (1,T,D)
        logits = self.model.lm.get_output_embeddings()(hidden[0, sample_rows])  # (N,V)
        tokens = sample(logits, [r.params for r in sampled_reqs], [r.generator for r in sampled_reqs])
        if self.prefix_cache is not None:
            for r in sampled_reqs:
                if not r.tokens:  # its prompt is prefilled as of this step
                    self.prefix_cache.store(r.prompt_keys, self.cache, r.slot)
        now = time.perf_counter()
        with self.lock:
            for r, tok in zip(sampled_reqs, tokens.tolist(), strict=True):
                self._append(r, tok, now)
            self.stats["steps"] += 1
            self.stats["step_tokens"] += cursor
        return cursor

    def _start_from_cache(self, r: Request, batch: list[Request]) -> bool:
        """Copy ``r``'s longest cached prompt prefix into its slot and return True; or return False (nothing done)
        when a request whose prefill is under way shares a longer prefix: waiting for it and copying beats
        computing the same positions twice (16 requests about one page arriving together prefill it once)."""
        limit = len(r.prompt_keys) - 1  # the last position is always computed: its logits give the first token
        found = self.prefix_cache.match(r.prompt_keys)
        cached = min(found[1], limit)
        for other in batch:
            if other is not r and other.prefill_start is not None and not other.tokens and not other.done:
                if min(shared_prefix(other.prompt_keys, r.prompt_keys), limit) >= cached + MIN_SHARED_PREFIX:
                    return False
        r.prefilled = r.metrics.cached_tokens = self.prefix_cache.load(r.prompt_keys, self.cache, r.slot, limit, found)
        return True

    def _append(self, r: Request, token: int, now: float) -> None:
        if r.first_token_time is None:
            r.first_token_time = now
            r.metrics.ttft_ms = 1e3 * (now - r.submitted)
            r.metrics.prefill_ms = 1e3 * (now - (r.prefill_start or now))
        r.tokens.append(token)
        self.stats["completion_tokens"] += 1
        if token in self.eos_ids:
            self._emit(r, final_reason="stop", include_last=False)
            return
        r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        for stop in r.params.stop:
            at = r.text.find(stop)
            if at != -1:
                r.text = r.text[:at]
                self._emit(r, final_reason="stop")
                return
        if len(r.tokens) >= r.params.max_tokens or len(r.prompt_embeds) + len(r.tokens) >= self.config.max_len:
            self._emit(r, final_reason="length")
            return
        self._emit(r, final_reason=None)

    def _emit(self, r: Request, final_reason: str | None, include_last: bool = True) -> None:
        text = r.text
        hold = 0
        if final_reason is None:
            # hold back a partial UTF-8 character and any tail that could still grow into a stop string
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
                with self.lock:
                    for r in list(self.running) + list(self.waiting):
                        r.events.put(Event(r.id, "", [], finished=True, finish_reason=f"error: {err}",
                                           metrics=r.metrics))
                        r.done = True
                        if r.slot is not None:
                            self.cache.release(r.slot)
                    self.running, self.waiting = [], deque()

    def queue_depth(self) -> int:
        return len(self.waiting)


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
