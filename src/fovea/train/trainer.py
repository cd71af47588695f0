"""The training recipe: stage ``align`` (encoder and LLM frozen, connector trained) and stage ``finetune``
(connector plus LLM, full or LoRA), on packed batches, one process or many (DDP or FSDP2 under torchrun).

One optimizer step reads ``batch_size`` samples (the global batch, whatever the number of processes): each process
takes its share, splits it into ``grad_accum`` packed streams, and the loss is the sum of token losses divided by
the step's total label tokens over all processes, so N processes follow the same loss curve as one.

Notation: T tokens in a packed stream, V vocabulary.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fovea.checkpoint import save_model
from fovea.config import settings_from_dict
from fovea.data.records import encode_record, load_dataset, read_records, split_ids, split_reference
from fovea.log import advance, say
from fovea.packing import IGNORE_INDEX, pack
from fovea.runtime import resolve_device, resolve_dtype
from fovea.train.evidence import (
    check_evidence,
    evidence_accuracy,
    evidence_loss,
    evidence_targets,
    group_by_page,
    pad_id,
)
from fovea.train.features import FeatureCache

STAGES = ("align", "finetune", "evidence")


@dataclass
class TrainConfig:
    data: str = ""  # training records: LLaVA conversation JSON or messages+images JSON/JSONL
    out: str = "runs/fovea"  # run folder: checkpoints/, final/, loss.png, log.jsonl
    model: str = "fastvithd-qformer-64"  # a fovea/transformers model directory or a preset name
    llm: str | None = None  # LLM for presets (default: SmolLM2 if fetched, else its shape)
    connector: dict = field(default_factory=dict)  # a preset's connector settings changed (name, num_queries, ...)
    stage: str = "align"  # align: connector only; finetune: connector + LLM (full, or LoRA when lora_rank > 0);
    #                       evidence: connector only, taught to transcribe each record's "evidence" into the LLM's
    #                       token embeddings (fovea.train.evidence: no LLM pass, for a bridge before finetune)
    lora_rank: int = 0  # finetune with LoRA adapters of this rank on the LLM; 0 = full finetune
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / rank)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # LLM modules that get adapters
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # samples per optimizer step, over all processes and accumulation micro-batches (stage
    #                      evidence: pages per step, each with all its questions)
    grad_accum: int = 1  # packed micro-batches per process per step
    max_len: int = 4096  # longest conversation in tokens; longer records are bad records
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 10  # linear warm-up from 0 to lr
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # auto (bf16 autocast where the device computes bf16 natively, else fp32), fp32 or bf16
    device: str = "auto"  # auto (CUDA if present, else CPU), cpu, cuda, cuda:N (under torchrun: the local GPU)
    eval_data: str | None = None  # held-out records; None = hold out eval_fraction of data
    eval_fraction: float = 0.1  # share of data held out when eval_data is None
    eval_every: int = 50  # steps between exact-match evaluations (0 = only at the end)
    eval_samples: int = 32  # held-out questions per evaluation
    eval_max_tokens: int = 32  # answer tokens generated per question
    save_every: int = 50  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    seed: int = 0  # data order, initialisation and dropout
    on_bad: str = "stop"  # a bad record stops the run ("stop") or is reported and left out ("skip")
    parallel: str = "ddp"  # with several processes: ddp, or fsdp (FSDP2 fully_shard)
    threads: int | None = None  # torch threads per process (default: torch's choice)
    cache_features: str = "bf16"  # the frozen encoder's output per page, computed once: bf16, fp32 (exact) or off
    feature_cache: str | None = None  # folder of cached features, reusable by runs with the same encoder and pages
    #                                   (default: <out>/features)

    # Allowed values of the settings that have a fixed set (checked by validate, listed by --help).
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "stage": STAGES, "precision": ("auto", "fp32", "bf16"), "parallel": ("ddp", "fsdp"), "on_bad": ("stop", "skip"),
        "cache_features": ("off", "fp32", "bf16"),
    }

    def __post_init__(self) -> None:
        if isinstance(self.connector, list | tuple):  # from flags: --connector name=perceiver num_queries=128
            self.connector = dict(_assignment(item) for item in self.connector)

    def validate(self) -> None:
        if not self.data:
            raise ValueError("no training data: set data (a LLaVA JSON or messages JSONL file)")
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.lora_rank and self.stage != "finetune":
            raise ValueError("lora_rank applies to stage 'finetune' only (align trains the connector alone)")
        for name in ("steps", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.lora_rank < 0 or self.keep_last < 1:
            raise ValueError("lr must be > 0, lora_rank >= 0 and keep_last >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return settings_from_dict(cls, data, "training", tuple_keys=("lora_targets",))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        import yaml

        file = Path(path)
        if not file.is_file():
            raise ValueError(f"training config {str(path)!r} does not exist")
        data = yaml.safe_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"training config {str(path)!r} must be a mapping of settings")
        return cls.from_dict(data)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean token loss per optimizer step
    evals: list[dict] = field(default_factory=list)  # {"step", "exact_match", "n"} per evaluation
    skipped: list[tuple[Any, str]] = field(default_factory=list)  # bad records left out
    final: Path | None = None  # the trained model (fovea directory), written by rank 0
    trainable_parameters: int = 0


# ----- distributed ------------------------------------------------------------------------------------------------
def _dist_setup(requested: str = "auto") -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(requested)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _all_sum(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# ----- the freeze policy per stage ----------------------------------------------------------------------------------
def configure_stage(model, cfg: TrainConfig):
    """What trains in each stage, in one place. align: connector only; finetune: connector + LLM, or connector +
    LoRA adapters on the LLM (base weights frozen). Returns peft's ``LoraModel`` holding the adapters (it merges
    or saves them at the end), or None without LoRA."""
    model.set_trainable(vision=False, connector=True, lm=cfg.stage == "finetune" and cfg.lora_rank == 0)
    if cfg.stage != "finetune" or cfg.lora_rank == 0:
        return None
    from peft import LoraConfig, LoraModel

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                      lora_dropout=0.0, bias="none")
    try:
        tuner = LoraModel(model.lm, lora, "default")  # adapters injected into model.lm in place
    except ValueError as err:
        raise ValueError(f"no LLM module matches lora_targets {list(cfg.lora_targets)}: {err}") from None
    for name, p in model.lm.named_parameters():
        p.requires_grad_("lora_" in name)
    return tuner


def save_adapter(tuner, path: Path) -> None:
    """The LoRA adapters alone, unmerged, in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``):
    a few MB that ``peft.PeftModel.from_pretrained(llm, path)`` puts back on the same base LLM."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(tuner.model, adapter_name="default")
    # peft names a saved adapter's weights from its PeftModel wrapper down: base_model (the LoraModel).model (the LLM)
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
              str(path / "adapter_model.safetensors"))
    tuner.peft_config["default"].save_pretrained(str(path))


# ----- schedule ---------------------------------------------------------------------------------------------------
def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, steps: int, min_lr_ratio: float):
    """transformers' linear warm-up then cosine decay to ``lr * min_lr_ratio``."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, steps, min_lr_rate=min_lr_ratio)


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The samples of optimizer step ``step``: consecutive positions of a per-epoch seeded permutation, so the data
    position is the step number alone and resuming needs no iterator state."""
    out, perms = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out.append(perms[epoch][pos % n])
    return out


# ----- checkpoints ------------------------------------------------------------------------------------------------
CKPT_PREFIX = "step-"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards are DTensors
            out[name] = t.detach().cpu().contiguous()
    return out


def _gather(model, optimizer, fsdp: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Trainable weights and optimizer state as full (unsharded) CPU tensors. Under FSDP every process must
    call this (it all-gathers the shards); otherwise it is a plain copy."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not fsdp:
        return _trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    return {n: full[n].contiguous() for n in names if n in full}, optim  # full only on the first process


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint; temporary folders of interrupted saves are never picked."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and not p.name.endswith(".tmp")
                  and (p / "state.pt").is_file() and (p / "trainable.safetensors").is_file())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, weights: dict[str, torch.Tensor], optim_state: dict, scheduler,
                    state: dict, keep_last: int) -> Path:
    """Write into ``step-N.tmp`` and rename: a kill mid-save leaves only a .tmp folder, which resume ignores."""
    from safetensors.torch import save_file

    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CKPT_PREFIX}{step:07d}"
    tmp = folder / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({**state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}, tmp / "state.pt")
    for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    kept = sorted(p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and not p.name.endswith(".tmp"))
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----- evaluation -------------------------------------------------------------------------------------------------
def exact_match(model, records, max_tokens: int) -> float:
    """Greedy answers through fovea's engine; a hit when the answer equals the reference after whitespace
    normalisation."""
    from fovea.engine import Engine, EngineConfig, SamplingParams

    was_training = model.training
    engine = Engine(model, EngineConfig(max_batch=8, max_len=8192, step_tokens=4096, encoder_cache=0))
    requests, answers = [], []
    for r in records:
        prompt, reference = split_reference(r)
        requests.append((prompt, list(r.images), SamplingParams(max_tokens=max_tokens)))
        answers.append(" ".join(reference.split()))
    with torch.no_grad():
        results = engine.generate(requests)
    model.train(was_training)
    hits = sum(" ".join(res["text"].split()) == ans for res, ans in zip(results, answers, strict=True))
    return hits / max(1, len(records))


def plot_losses(losses: list[float], evals: list[dict], path: Path) -> None:
    from fovea.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="train loss (mean per token)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e["exact_match"] for e in evals], "o-", color="tab:green",
                 label="held-out exact match")
        ax2.set_ylabel("exact match")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("fovea training")
    save_figure(fig, path)


# ----- the loop ---------------------------------------------------------------------------------------------------
def _load_model(cfg: TrainConfig, device: torch.device):
    from fovea.loading import load_vlm

    torch.manual_seed(cfg.seed)  # presets initialise the connector randomly: the same on every process
    # fp32 weights (the master copy for what trains); bf16 comes from autocast in the loop. Frozen encoder: fused.
    return load_vlm(cfg.model, llm=cfg.llm, progress=lambda s: None, device=str(device), dtype="float32",
                    connector=cfg.connector, seed=cfg.seed)


def _assignment(item: str) -> tuple[str, Any]:
    """``name=value`` with the value read as YAML reads it (128 -> int, true -> bool, perceiver -> str)."""
    import yaml

    name, sep, value = str(item).partition("=")
    if not sep or not name:
        raise ValueError(f"connector setting {item!r} is not name=value (e.g. num_queries=128)")
    return name, yaml.safe_load(value)


def _packed_loss(model, batch) -> torch.Tensor:
    """Sum of token losses of one packed stream."""
    kwargs = batch.lm_kwargs()
    kwargs.pop("labels", None)
    logits = model(batch.input_ids[None], batch.images, batch.instructions or None, batch.image_sizes,
                   **kwargs).logits  # (1,T,V)
    targets = batch.labels[1:].to(logits.device)  # position t predicts token t+1
    return F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


class TrainRecipe:
    """One training run, laid out as torchtune lays out a recipe: ``setup`` (processes, model and stage, data,
    parallel wrapper, optimizer and schedule, resume), then per step ``train_step``, ``evaluate`` and ``save`` as
    their intervals say, ``finish`` (the final model), ``cleanup``. ``run`` drives them."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        cfg.validate()
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.out = Path(cfg.out)
        self.bar = self.log = None
        self.start = 0

    # ----- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world, self.device = _dist_setup(cfg.device)
        if cfg.stage == "evidence" and self.world > 1:
            raise ValueError("stage evidence runs in one process (its loss does not go through the parallel "
                             "wrapper); run it without torchrun")
        # bf16 autocast keeps fp32 master weights for what trains; the policy refuses bf16 where it is emulated.
        low = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[cfg.precision]
        self.bf16 = resolve_dtype(low, self.device) == torch.bfloat16
        self.main = self.rank == 0
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {self.world} processes x "
                             f"grad_accum {cfg.grad_accum}")
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.model = _load_model(cfg, self.device)
        self.lora = configure_stage(self.model, cfg)
        trainable = self.model.num_trainable_parameters()
        self.say(f"fovea train: stage {cfg.stage}{f' (LoRA rank {cfg.lora_rank})' if cfg.lora_rank else ''}, "
                 f"{trainable:,} trainable parameters of {sum(p.numel() for p in self.model.parameters()):,}, "
                 f"{self.world} process(es)")
        self._setup_data()
        self.result = TrainResult(skipped=self.skipped, trainable_parameters=trainable)
        self._setup_parallel()
        # The optimizer is built on the wrapped model's parameters (FSDP2 replaces them with sharded ones).
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        if self.resume:
            self._resume()
        self._setup_logging()

    def say(self, text: str) -> None:
        if self.main:
            say(text)

    def _setup_data(self) -> None:
        cfg = self.cfg
        processor = self.model.processor()
        cache = None
        if cfg.cache_features != "off":  # both stages freeze the encoder: each page is encoded once per run
            cache = FeatureCache(self.model, cfg.feature_cache or self.out / "features", cfg.cache_features)
        from tqdm.auto import tqdm

        if cfg.stage == "evidence":  # before any page is read or encoded
            check_evidence(read_records(cfg.data) + (read_records(cfg.eval_data) if cfg.eval_data else []))
        bar = tqdm(desc="reading data", unit="record", disable=not (self.progress and self.main))
        data = load_dataset(cfg.data, processor, on_bad=cfg.on_bad, max_len=cfg.max_len, report=self.say,
                            transform=cache, progress=lambda done, total: advance(bar, done, total))
        bar.close()
        if cache is not None:
            self.say(f"fovea train: encoder features cached ({cfg.cache_features}): {cache.encoded} pages encoded, "
                     f"{cache.loaded} read from {cache.folder}, {cache.reused} reuses by later questions")
        samples = data.samples
        if cfg.eval_data:
            eval_records = read_records(cfg.eval_data)[: cfg.eval_samples]
            for r in eval_records:  # reject a bad held-out record now rather than at the first evaluation
                encode_record(r, processor)
        else:  # held-out records were encoded with the rest: they are known good
            train_ids, eval_ids = split_ids(samples, cfg.eval_fraction, cfg.seed)
            eval_records = [data.records[i] for i in eval_ids][: cfg.eval_samples]
            samples = [samples[i] for i in train_ids]
        if not samples:
            raise ValueError("no training samples left after holding out the evaluation share")
        self.samples, self.eval_records, self.skipped = samples, eval_records, data.skipped
        if cfg.stage == "evidence":
            self._setup_evidence(data, processor, cache, None if cfg.eval_data else (train_ids, eval_ids))
        self.say(f"fovea train: {len(samples)} training samples, {len(eval_records)} held-out questions, "
                 f"{len(data.skipped)} records skipped")

    def _setup_evidence(self, data, processor, cache, split: tuple[list[int], list[int]] | None) -> None:
        """Stage evidence: each sample's target tokens, and held-out samples (features, not records) to score.
        ``split``: the (train, held-out) sample indices when the held-out share comes from ``data``."""
        budget = self.model.connector.budget
        if budget is None:
            raise ValueError(f"stage evidence needs a bridge with a fixed token budget, not "
                             f"{self.model.config.connector.name!r}")
        tokenizer, self.pad = processor.tokenizer, pad_id(processor.tokenizer)
        train_records = data.records if split is None else [data.records[i] for i in split[0]]
        self.targets, cut = evidence_targets(train_records, tokenizer, budget)
        self.pages = group_by_page(self.samples)
        if self.cfg.eval_data:
            held = load_dataset(self.cfg.eval_data, processor, on_bad=self.cfg.on_bad, max_len=self.cfg.max_len,
                                report=self.say, transform=cache)
            held_samples, held_records = held.samples, held.records
        else:
            held_samples, held_records = [data.samples[i] for i in split[1]], [data.records[i] for i in split[1]]
        self.eval_samples = held_samples[: self.cfg.eval_samples]
        self.eval_targets, _ = evidence_targets(held_records[: self.cfg.eval_samples], tokenizer, budget)
        self.say(f"fovea train: evidence targets of {budget} tokens ({cut} evidences cut to fit), "
                 f"{len(self.pages)} training pages, "
                 f"{len(self.eval_samples)} held-out questions scored by token accuracy")

    def _setup_parallel(self) -> None:
        self.wrapped, self.fsdp = self.model, self.world > 1 and self.cfg.parallel == "fsdp"
        if self.world == 1:
            return
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.lm.model.layers:
                fully_shard(layer)
            fully_shard(self.model)
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            self.say(f"fovea train: --resume found no complete checkpoint under {self.out / 'checkpoints'}; "
                     "starting fresh")
            return
        self.start = _restore(ckpt, self.cfg, self.model, self.optimizer, self.scheduler, self.result, self.fsdp)
        self.say(f"fovea train: resumed from {ckpt.name} (step {self.start})")

    def _setup_logging(self) -> None:
        if not self.main:
            return
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.steps, initial=self.start, desc=f"train {self.cfg.stage}", unit="step",
                            file=sys.stderr)
        log_file = self.out / "log.jsonl"
        if log_file.is_file():  # steps after the restored checkpoint run again: drop them
            lines = log_file.read_text().splitlines()
            log_file.write_text("".join(x + "\n" for x in lines if json.loads(x).get("step", 0) <= self.start))
        self.log = open(log_file, "a")

    # ----- the step ---------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> float:
        """One optimizer step over the step's global batch; the mean token loss."""
        cfg, world, device = self.cfg, self.world, self.device
        t0 = time.perf_counter()
        if cfg.stage == "evidence":  # whole pages: batch_size pages, each with all its questions
            pages = step_indices(step, cfg.batch_size, len(self.pages), cfg.seed)
            return self._log_step(step, self._evidence_step([i for p in pages for i in self.pages[p]]), 0, t0)
        per_rank = cfg.batch_size // world
        mine = step_indices(step, cfg.batch_size, len(self.samples), cfg.seed)[self.rank * per_rank:
                                                                                (self.rank + 1) * per_rank]
        chunks = [mine[i::cfg.grad_accum] for i in range(cfg.grad_accum)]
        batches = [pack([self.samples[i] for i in c], image_token_id=self.model.image_token_id).to(device)
                   for c in chunks]
        total_labels = _all_sum(sum(int((b.labels[1:] != IGNORE_INDEX).sum()) for b in batches), device)
        if total_labels == 0:
            raise ValueError(f"step {step}: the batch has no answer tokens to learn from")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        loss_sum, tokens = 0.0, 0
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1 or world == 1 or cfg.parallel != "ddp"
            with (nullcontext() if sync else self.wrapped.no_sync()), autocast:
                loss = _packed_loss(self.wrapped, batch)
            # DDP averages gradients over processes: scale so the result is the global per-token mean.
            (loss * world / total_labels).backward()
            loss_sum += float(loss.detach())
            tokens += int(batch.input_ids.numel())
        self._optimizer_step()
        return self._log_step(step, _all_sum(loss_sum, device) / total_labels, _all_sum(tokens, device), t0)

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _evidence_step(self, mine: list[int]) -> float:
        """One step of stage evidence (one process): the mean loss."""
        loss = evidence_loss(self.model, [self.samples[i] for i in mine], [self.targets[i] for i in mine], self.pad)
        loss.backward()
        self._optimizer_step()
        return float(loss.detach())

    def _log_step(self, step: int, step_loss: float, all_tokens: float, t0: float) -> float:
        seconds = time.perf_counter() - t0
        self.result.losses.append(step_loss)
        if self.log:
            self.log.write(json.dumps({"step": step + 1, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0],
                                       "tokens": all_tokens, "seconds": seconds}) + "\n")
            self.log.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{step_loss:.4f}", **({"tok_s": f"{all_tokens / seconds:,.0f}"}
                                                              if all_tokens else {}))
            self.bar.update(1)
        return step_loss

    def evaluate(self, done: int) -> None:
        """Exact match on the held-out questions, on the first process (the others wait)."""
        evaluated = _unsharded(self.model, self.optimizer, self.cfg, self.fsdp, self.main)[0] \
            if self.eval_records else None
        if self.main and self.eval_records and self.cfg.stage == "evidence":
            scores = evidence_accuracy(evaluated, self.eval_samples, self.eval_targets, self.pad)
            self.result.evals.append({"step": done, **scores, "n": len(self.eval_samples)})
            self.say(f"fovea train: step {done}: held-out evidence tokens read {scores['token_accuracy']:.3f}, "
                     f"whole evidence {scores['exact_match']:.3f} ({len(self.eval_samples)} questions)")
        elif self.main and self.eval_records:
            em = exact_match(evaluated, self.eval_records, self.cfg.eval_max_tokens)
            self.result.evals.append({"step": done, "exact_match": em, "n": len(self.eval_records)})
            self.say(f"fovea train: step {done}: held-out exact match {em:.3f} ({len(self.eval_records)} questions)")
        if dist.is_initialized():
            dist.barrier()

    def save(self, done: int) -> None:
        state = _progress_state(done, self.result, self.cfg)
        weights, optim_state = _gather(self.model, self.optimizer, self.fsdp)
        if self.main:
            save_checkpoint(self.out, done, weights, optim_state, self.scheduler, state, self.cfg.keep_last)
            plot_losses(self.result.losses, self.result.evals, self.out / "loss.png")
        if dist.is_initialized():
            dist.barrier()

    def finish(self) -> None:
        """The final model: ``final/`` (a plain fovea model, LoRA merged into the LLM) and, with LoRA, the
        adapters unmerged in ``adapter/``."""
        final_model, lora = _unsharded(self.model, self.optimizer, self.cfg, self.fsdp, self.main, self.lora)
        if self.main:
            if lora is not None:
                save_adapter(lora, self.out / "adapter")
                final_model.lm = lora.merge_and_unload()
            save_model(final_model, self.out / "final")
            self.result.final = self.out / "final"
            plot_losses(self.result.losses, self.result.evals, self.out / "loss.png")
            self.say(f"fovea train: wrote {self.out / 'final'} and {self.out / 'loss.png'}")
        if dist.is_initialized():
            dist.barrier()

    def cleanup(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log:
            self.log.close()

    def run(self, stop_after: int | None = None) -> TrainResult:
        """``stop_after``: leave after this many steps, as a preempted job would (nothing final is written)."""
        self.setup()
        cfg = self.cfg
        self.model.train()
        try:
            for step in range(self.start, cfg.steps):
                if stop_after is not None and step - self.start >= stop_after:
                    return self.result
                self.train_step(step)
                done = step + 1
                if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                    self.evaluate(done)
                if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                    self.save(done)
        finally:
            self.cleanup()
        self.finish()
        return self.result


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Run the recipe. ``resume``: continue from the last complete checkpoint under ``cfg.out``. ``stop_after``:
    leave after this many steps in this session, as a preempted job would (nothing final is written)."""
    return TrainRecipe(cfg, resume=resume, progress=progress).run(stop_after)


def _unsharded(model, optimizer, cfg: TrainConfig, fsdp: bool, main_process: bool, lora=None):
    """The model as one process can run it, and its LoRA tuner: itself, or under FSDP an unsharded copy on the
    first process (every process takes part in gathering the shards; the others get None)."""
    if not fsdp:
        return model, lora
    weights, _ = _gather(model, optimizer, fsdp)
    if not main_process:
        return None, None
    with torch.random.fork_rng(devices=[]):  # building the copy reseeds; the run's RNG stream must not move
        copy = _load_model(cfg, torch.device("cpu"))
    copy_lora = configure_stage(copy, cfg)
    copy.load_state_dict(weights, strict=False)
    return copy, copy_lora


def _progress_state(step: int, result: TrainResult, cfg: TrainConfig) -> dict:
    return {
        "step": step, "losses": list(result.losses), "evals": list(result.evals), "config": asdict(cfg),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }


# Settings that may change between a checkpoint and its resumption; any other change is refused.
_RESUMABLE = {"steps", "out", "eval_every", "save_every", "keep_last", "threads", "eval_samples", "eval_max_tokens"}


def _restore(ckpt: Path, cfg: TrainConfig, model, optimizer, scheduler, result: TrainResult, fsdp: bool) -> int:
    from safetensors.torch import load_file

    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    saved = state.get("config", {})
    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    changed = sorted(k for k, v in asdict(cfg).items() if k not in _RESUMABLE and norm(saved.get(k)) != norm(v))
    if changed:
        raise ValueError(f"checkpoint {str(ckpt)!r} was written with different settings {changed}; resume with the "
                         "same configuration")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"checkpoint {str(ckpt)!r} does not hold this model's trainable weights: missing "
                         f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}")
    if fsdp:  # every process reads the full tensors and keeps its shard
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    result.losses, result.evals = list(state["losses"]), list(state["evals"])
    return int(state["step"])
