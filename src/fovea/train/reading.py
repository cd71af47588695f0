"""The reading curriculum: pretrain a registered hybrid encoder to read rendered text, with dense supervision.

Each step draws fresh crops (a pure function of the run's seed and the step): a batch of single lines and a batch
of multi-line page crops (paragraphs, forms, tables). Every drawn run is read back by a light head from the encoder's
grid: the head samples the feature rows around the run's centre line at each cell under it, turns each cell into
``subcells`` character slots, and a CTC loss compares them with the run's text. So the encoder's own grid must hold
every character where it was drawn, which is what a connector later reads.

Checkpoints are written to a temporary folder and renamed; ``resume`` continues on the same data and loss curve.

Notation: B crops, C channels, h x w grid, R runs, N cells along a run, S = N * subcells slots, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fovea.config import VisionConfig, settings_from_dict
from fovea.data.reading import CHARSET, LAYOUTS, TextSample, check_fonts, decode_ids, encode_text, render_text
from fovea.plotting import pyplot, save_figure
from fovea.runtime import placement
from fovea.train.trainer import lr_schedule
from fovea.vision import available_encoders, build_encoder

HELD_OUT_BASE = 1 << 62  # held-out seeds start here; training seeds stay below (see _train_seed)
_BLOCK_LAYOUTS = tuple(x for x in LAYOUTS if x != "line")


@dataclass
class ReadingConfig:
    out: str = "runs/reader"  # run folder: checkpoints/, final/, log.jsonl, curve.png
    encoder: str = "fovea-reader"  # encoder registry key; must have a stride that divides the crop sizes
    init: str | None = None  # start from: encoder weights (.safetensors), a reader folder (encoder + probe head,
    # e.g. "bundled:reader" or a run's final/), or None for random init
    steps: int = 3000  # optimizer steps
    lines: int = 16  # single-line crops per step
    line_size: tuple[int, int] = (32, 512)  # line crop (height, width) in px
    blocks: int = 2  # multi-line page crops per step
    block_size: tuple[int, int] = (160, 512)  # page crop (height, width) in px
    sizes: tuple[int, int] = (10, 24)  # font sizes in px: body text of a 2880x2160 page resized to 1536 is ~12-16
    fonts: tuple[str, ...] = ()  # font files to draw with (empty = every DejaVu face on the machine)
    degrade: float = 1.0  # probability scale of scan damage (0 = clean renders)
    rotate: float = 0.0  # largest skew in degrees (the bundled reader was trained with 0; 0.3-0.5 adds skew)
    subcells: int = 4  # character slots per grid cell read by the head
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_steps: int = 100  # linear warm-up
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # compute precision: auto (bf16 where native, else fp32), float32, bfloat16
    threads: int | None = None  # torch threads (default: torch's choice)
    save_every: int = 100  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept
    eval_every: int = 250  # steps between held-out probe evaluations (0 = only at the end)
    eval_lines: int = 128  # held-out lines per evaluation
    eval_blocks: int = 16  # held-out page crops per evaluation
    seed: int = 0  # data stream and initialisation

    def validate(self) -> None:
        if self.encoder not in available_encoders():
            raise ValueError(f"unknown encoder {self.encoder!r}; available: {available_encoders()}")
        check_fonts(self.fonts or None)
        for name in ("steps", "subcells", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lines < 0 or self.blocks < 0 or self.lines + self.blocks == 0:
            raise ValueError(f"lines ({self.lines}) and blocks ({self.blocks}) must be >= 0 and not both 0")
        if not 4 <= self.sizes[0] <= self.sizes[1] <= self.line_size[0]:
            raise ValueError(f"sizes {self.sizes} must satisfy 4 <= min <= max <= line height {self.line_size[0]}")
        if self.init and not Path(_init_path(self.init)).exists():
            raise ValueError(f"init weights {self.init!r} do not exist")

    def check_stride(self, stride: int) -> None:
        for name in ("line_size", "block_size"):
            h, w = getattr(self, name)
            if h % stride or w % stride:
                raise ValueError(f"{name} {w}x{h} (WxH) is not divisible by the encoder stride {stride}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReadingConfig:
        return settings_from_dict(cls, data, "reading", tuple_keys=("line_size", "block_size", "sizes", "fonts"))


class ReadingHead(nn.Module):
    """Reads one text run from an encoder grid: at each cell under the run, the two feature rows nearest its centre
    line and where the line falls between them go through a small MLP to ``subcells`` character slots."""

    def __init__(self, *, channels: int, stride: int, subcells: int = 4, hidden: int = 384) -> None:
        super().__init__()
        self.stride, self.subcells, self.vocab = stride, subcells, len(CHARSET) + 1
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(2 * channels + 1, hidden), nn.GELU(),
                                 nn.Linear(hidden, subcells * self.vocab))

    def cells(self, box: tuple[int, int, int, int], width: int) -> tuple[int, int]:
        """The grid columns [c0, c1) under a run's box."""
        w = width // self.stride
        return max(0, box[0] // self.stride), min(w, -(-box[2] // self.stride))

    def forward(self, features: torch.Tensor, runs: list[tuple[int, tuple[int, int, int, int]]]) -> list[torch.Tensor]:
        """``features`` (B,C,h,w); ``runs`` (crop index, box px) -> per run log-probs (S, V)."""
        _, _, h, w = features.shape
        grid = self.norm(features.float().permute(0, 2, 3, 1))  # (B,C,h,w) -> (B,h,w,C)
        out = []
        for b, box in runs:
            c0, c1 = self.cells(box, w * self.stride)
            centre = (box[1] + box[3]) / 2 / self.stride - 0.5  # in row units, cell centres at integers
            top = min(max(int(math.floor(centre)), 0), h - 1)
            bottom = min(top + 1, h - 1)
            frac = torch.full((c1 - c0, 1), min(max(centre - top, 0.0), 1.0), device=grid.device)
            x = torch.cat([grid[b, top, c0:c1], grid[b, bottom, c0:c1], frac], dim=-1)  # (N, 2C+1)
            logits = self.mlp(x).reshape((c1 - c0) * self.subcells, self.vocab)  # (N, sub*V) -> (S, V)
            out.append(logits.log_softmax(-1))
        return out


def greedy_decode(log_probs: torch.Tensor) -> str:
    """CTC best path: argmax per slot, repeats merged, blanks dropped."""
    ids = log_probs.argmax(-1).tolist()
    return decode_ids([i for j, i in enumerate(ids) if i and (j == 0 or ids[j - 1] != i)])


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _train_seed(run_seed: int, step: int, index: int) -> int:
    return ((run_seed * 1_000_003 + step) * 4096 + index) % HELD_OUT_BASE


def _to_pixels(samples: list[TextSample]) -> torch.Tensor:
    arr = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples]) / 255.0  # (B,H,W,3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (B,3,H,W) in [0, 1]


def draw_batch(cfg: ReadingConfig, seeds: list[int], kind: str) -> list[TextSample]:
    """Crops for ``seeds``: single lines (kind "line") or page crops cycling through the block layouts."""
    if kind == "line":
        h, w = cfg.line_size
        return [render_text(s, layout="line", height=h, width=w, sizes=cfg.sizes, fonts=cfg.fonts or None,
                            degrade=cfg.degrade, rotate=cfg.rotate) for s in seeds]
    h, w = cfg.block_size
    return [render_text(s, layout=_BLOCK_LAYOUTS[s % len(_BLOCK_LAYOUTS)], height=h, width=w, sizes=cfg.sizes,
                        fonts=cfg.fonts or None, degrade=cfg.degrade, rotate=cfg.rotate) for s in seeds]


class Reader(nn.Module):
    """Encoder + reading head: the module the curriculum trains and the probe evaluates."""

    def __init__(self, encoder: nn.Module, head: ReadingHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def read(self, samples: list[TextSample], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        pixels = _to_pixels(samples).to(device)
        runs = [(b, box) for b, s in enumerate(samples) for _, box in s.runs]
        if not runs:
            return []
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            features = self.encoder.features(pixels)  # (B,3,H,W) -> (B,C,h,w)
        return self.head(features, runs)


def ctc_loss(log_probs: list[torch.Tensor], texts: list[str]) -> torch.Tensor:
    """Mean per-character CTC loss over runs (runs with more characters than slots are left out)."""
    keep = [i for i, t in enumerate(texts) if 0 < len(t) <= log_probs[i].shape[0]]
    if not keep:
        return log_probs[0].sum() * 0.0
    longest = max(log_probs[i].shape[0] for i in keep)
    padded = torch.stack([F.pad(log_probs[i], (0, 0, 0, longest - log_probs[i].shape[0])) for i in keep], 1)  # (S,R,V)
    device = padded.device
    targets = torch.tensor([c for i in keep for c in encode_text(texts[i])], dtype=torch.long, device=device)
    return F.ctc_loss(padded, targets, torch.tensor([log_probs[i].shape[0] for i in keep], device=device),
                      torch.tensor([len(texts[i]) for i in keep], device=device), zero_infinity=True,
                      reduction="mean")


@torch.no_grad()
def held_out_sets(lines: int, blocks: int) -> tuple[tuple[str, int, int], ...]:
    """(kind, count, seed offset from the held-out base) of the probe's two sets: lines, then page crops."""
    return (("line", lines, 0), ("block", blocks, 1 << 40))


class ReadingTally:
    """Errors, characters, exact runs and runs per set ("line", "field" = the lines holding a whole field value,
    "block" = page-crop runs), and the probe's figures from them."""

    def __init__(self) -> None:
        self.stats = {"line": [0, 0, 0, 0], "field": [0, 0, 0, 0], "block": [0, 0, 0, 0]}

    def add(self, kind: str, is_field: bool, guess: str, text: str) -> None:
        for key in (kind, "field") if kind == "line" and is_field else (kind,):
            st = self.stats[key]
            st[0] += edit_distance(guess, text)
            st[1] += len(text)
            st[2] += guess == text
            st[3] += 1

    def summary(self) -> dict[str, float]:
        out = {}
        for key, (err, chars, exact, runs) in self.stats.items():
            if runs:
                out[f"{key}_char_acc"] = max(0.0, 1 - err / max(chars, 1))
                out[f"{key}_exact"] = exact / runs
                out[f"{key}_runs"] = runs
        return out


def probe(reader: Reader, cfg: ReadingConfig, device: torch.device, dtype: torch.dtype, *, lines: int, blocks: int,
          seed_base: int = HELD_OUT_BASE, batch: int = 16) -> dict[str, float]:
    """Held-out reading accuracy: character accuracy (1 - edit distance / characters) and exact match, on single
    lines, on whole field values among them, and on page-crop runs. Seeds from ``seed_base`` up, never trained on."""
    was_training = reader.training
    reader.eval()
    tally = ReadingTally()
    for kind, count, offset in held_out_sets(lines, blocks):
        for start in range(0, count, batch):
            seeds = [seed_base + offset + i for i in range(start, min(count, start + batch))]
            samples = draw_batch(cfg, seeds, kind)
            preds = iter(reader.read(samples, device, dtype))
            for s in samples:
                for (text, _), is_field in zip(s.runs, s.fields, strict=True):
                    tally.add(kind, is_field, greedy_decode(next(preds)), text)
    reader.train(was_training)
    return tally.summary()


def _init_path(init: str) -> str:
    if init == "bundled:reader":
        from fovea.vision import bundled_reader_dir

        return str(bundled_reader_dir())
    return init


def build_reader(cfg: ReadingConfig) -> Reader:
    """Encoder + head, random or from ``cfg.init`` (a reader folder restores the probe head too, so a later run
    continues where a shipped reader stopped)."""
    from safetensors.torch import load_file

    torch.manual_seed(cfg.seed)
    init = Path(_init_path(cfg.init)) if cfg.init else None
    folder = init if init is not None and init.is_dir() else None
    weights = str(folder / "encoder.safetensors") if folder else (str(init) if init else None)
    encoder = build_encoder(VisionConfig(name=cfg.encoder, weights=weights))
    head = ReadingHead(channels=encoder.channels, stride=encoder.stride, subcells=cfg.subcells)
    if folder is not None and (folder / "head.safetensors").is_file():
        try:
            head.load_state_dict(load_file(str(folder / "head.safetensors")))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"probe head in {folder} does not fit subcells={cfg.subcells}: {err}") from err
    return Reader(encoder, head)


def _latest(out: Path) -> Path | None:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp") and (p / "state.pt").is_file())
    return done[-1] if done else None


def _save(out: Path, step: int, reader: Reader, optimizer, scheduler, log_state: dict, keep_last: int) -> None:
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / f"step-{step:07d}", folder / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"model": reader.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "rng": torch.get_rng_state(), **log_state}, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as fh:
        os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in sorted(p for p in folder.glob("step-*") if not p.name.endswith(".tmp"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class ReadingResult:
    losses: list[float] = field(default_factory=list)  # loss per step
    evals: list[dict] = field(default_factory=list)  # probe results with step and cpu_minutes
    final: Path | None = None  # folder with encoder.safetensors, head.safetensors, reading.json
    cpu_seconds: float = 0.0  # process CPU time spent training, over all runs of this folder


def _restore(ckpt: Path, reader: Reader, optimizer, scheduler, result: ReadingResult, device) -> int:
    """Load a checkpoint into the run's objects; the step it was written at."""
    try:
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        reader.load_state_dict(state["model"])
    except Exception as err:  # noqa: BLE001  (any unreadable checkpoint gets its name in the error)
        raise ValueError(f"checkpoint {ckpt} is corrupt or from another encoder: {err}") from err
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    result.losses, result.evals, result.cpu_seconds = state["losses"], state["evals"], state["cpu_seconds"]
    return state["step"]


def _train_step(reader: Reader, cfg: ReadingConfig, step: int, place, optimizer, scheduler) -> float:
    """One step on the step's freshly drawn lines and page crops (seeded by the step alone); its CTC loss."""
    log_probs, texts = [], []
    for kind, count in (("line", cfg.lines), ("block", cfg.blocks)):
        if count:
            offset = 0 if kind == "line" else 2048
            samples = draw_batch(cfg, [_train_seed(cfg.seed, step, offset + i) for i in range(count)], kind)
            log_probs += reader.read(samples, place.device, place.dtype)
            texts += [t for s in samples for t, _ in s.runs]
    loss = ctc_loss(log_probs, texts)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reader.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def train_reading(cfg: ReadingConfig, *, resume: bool = False, progress: bool = True) -> ReadingResult:
    """Run (or continue) the reading curriculum; returns its losses, probe results and the final folder."""
    from tqdm import tqdm

    cfg.validate()
    place = placement(cfg.device, cfg.dtype, cfg.threads)
    reader = build_reader(cfg)
    cfg.check_stride(reader.encoder.stride)
    reader.to(place.device)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    out = Path(cfg.out)
    result, start = ReadingResult(), 0
    ckpt = _latest(out) if resume else None
    if resume and ckpt is None and out.joinpath("checkpoints").is_dir():
        raise ValueError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
    if ckpt is not None:
        start = _restore(ckpt, reader, optimizer, scheduler, result, place.device)
    elif out.joinpath("checkpoints").is_dir() and any(out.joinpath("checkpoints").iterdir()):
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "reading.json").write_text(json.dumps(asdict(cfg), indent=2))
    log_file = out / "log.jsonl"
    if log_file.is_file():  # steps logged after the checkpoint we resume from are run again: drop their records
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= start]
        log_file.write_text("".join(line + "\n" for line in kept))
    log = open(log_file, "a")  # noqa: SIM115  (open for the whole run)
    reader.train()
    cpu0 = time.process_time() - result.cpu_seconds
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="reading")
    for step in bar:
        result.losses.append(_train_step(reader, cfg, step, place, optimizer, scheduler))
        result.cpu_seconds = time.process_time() - cpu0
        record = {"step": step + 1, "loss": result.losses[-1], "lr": scheduler.get_last_lr()[0],
                  "cpu_minutes": result.cpu_seconds / 60}
        done = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done:
            evaluation = probe(reader, cfg, place.device, place.dtype, lines=cfg.eval_lines, blocks=cfg.eval_blocks)
            result.evals.append({"step": step + 1, "cpu_minutes": result.cpu_seconds / 60, **evaluation})
            record["eval"] = evaluation
            bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation.items()
                                                      if not k.endswith("runs")))
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        if (step + 1) % cfg.save_every == 0 or done:
            _save(out, step + 1, reader, optimizer, scheduler,
                  {"losses": result.losses, "evals": result.evals, "cpu_seconds": result.cpu_seconds}, cfg.keep_last)
    log.close()
    result.final = export_reader(reader, cfg, out / "final", result)
    plot_reading_curve(result, out / "curve.png")
    return result


def export_reader(reader: Reader, cfg: ReadingConfig, folder: Path, result: ReadingResult) -> Path:
    """The trained encoder as bf16 safetensors (metadata: licence, provenance, architecture) plus its probe head."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    start = f"continued from {cfg.init}" if cfg.init else "trained from scratch"
    meta = {"license": "Apache-2.0", "provenance": f"fovea reading curriculum (fovea pretrain), {start} on rendered "
            "DejaVu text; no third-party weights", "encoder": cfg.encoder,
            "steps": str(len(result.losses)), "cpu_hours": f"{result.cpu_seconds / 3600:.2f}"}
    enc = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in reader.encoder.model.state_dict().items()
           if v.is_floating_point()}
    enc |= {k: v.detach().contiguous() for k, v in reader.encoder.model.state_dict().items()
            if not v.is_floating_point()}
    save_file(enc, str(folder / "encoder.safetensors"), metadata=meta)
    save_file({k: v.detach().float().contiguous() for k, v in reader.head.state_dict().items()},
              str(folder / "head.safetensors"), metadata=meta)
    (folder / "reading.json").write_text(json.dumps({**asdict(cfg), "evals": result.evals}, indent=2))
    return folder


def export_checkpoint(run: str | Path, dest: str | Path) -> Path:
    """Export the newest complete checkpoint of the run in ``run`` as a reader folder (what ``final/`` holds), e.g.
    to ship or evaluate a run that is still going."""
    run = Path(run)
    cfg_file = run / "reading.json"
    ckpt = _latest(run)
    if ckpt is None or not cfg_file.is_file():
        raise ValueError(f"{run} has no complete checkpoint and reading.json to export")
    cfg = ReadingConfig.from_dict(json.loads(cfg_file.read_text()))
    reader = build_reader(ReadingConfig(**{**asdict(cfg), "init": None}))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    reader.load_state_dict(state["model"])
    result = ReadingResult(losses=state["losses"], evals=state["evals"], cpu_seconds=state["cpu_seconds"])
    return export_reader(reader, cfg, Path(dest), result)


def plot_reading_curve(result: ReadingResult, path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(range(1, len(result.losses) + 1), result.losses, lw=0.6)
    ax1.set(xlabel="step", ylabel="CTC loss", yscale="log", title="reading curriculum loss")
    if result.evals:
        minutes = [e["cpu_minutes"] for e in result.evals]
        for key, label in (("line_char_acc", "line chars"), ("field_exact", "field exact"),
                           ("block_char_acc", "page-crop chars")):
            ax2.plot(minutes, [e.get(key, float("nan")) for e in result.evals], marker="o", label=label)
    ax2.set(xlabel="CPU-minutes", ylabel="held-out accuracy", ylim=(0, 1), title="held-out reading probe")
    ax2.legend()
    save_figure(fig, path)

