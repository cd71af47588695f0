"""What every benchmark shares: a fixed thread count, the environment it ran in, a repeat timer, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    import timm
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "timm": timm.__version__, "threads": torch.get_num_threads(), "device": device,
        "machine": platform.machine(), "platform": platform.platform(),
    }


def describe(env: dict[str, Any]) -> str:
    return (f"device={env['device']} threads={env['threads']} torch={env['torch']} "
            f"transformers={env['transformers']} timm={env['timm']}")


@dataclass
class Timing:
    median_s: float  # median of the measured runs
    min_s: float  # fastest run
    max_s: float  # slowest run
    runs: int  # measured runs (warm-up excluded)

    def to_dict(self) -> dict[str, float]:
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s, "runs": self.runs}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; returns median, min and max."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def save_results(payload: dict[str, Any], out_dir: str | Path, name: str,
                 chart: Callable[[dict[str, Any], Path], None], progress: Callable[[str], None]) -> dict[str, Any]:
    """Write ``<name>.json`` and the ``<name>.png`` chart under ``out_dir``; returns the payload."""
    out = Path(out_dir)
    write_json(out / f"{name}.json", payload)
    chart(payload, out / f"{name}.png")
    progress(f"[bench {name}] wrote {out / (name + '.json')} and {out / (name + '.png')}")
    return payload


def reset_peak_memory() -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or the process's peak RSS on Linux."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float | None:
    """Peak memory since ``reset_peak_memory``: CUDA allocated, else the process's peak RSS (VmHWM); None if
    neither can be read."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def time_adaptive(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, budget_s: float = 60.0) -> Timing:
    """Like ``time_call``, but a run that alone takes more than half of ``budget_s`` is not repeated: the first
    run is then the only measurement (and there is no separate warm-up). Reports how many runs were measured."""
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    if first > budget_s / 2:
        return Timing(first, first, first, 1)
    rest = max(1, min(repeats, int(budget_s // max(first, 1e-3)) - warmup))
    if warmup <= 1:
        return time_call(fn, warmup=0, repeats=rest)
    return time_call(fn, warmup=warmup - 1, repeats=rest)


def matmul_gflops(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """The machine's dense matmul rate in ``dtype`` (GFLOP/s, median of ``repeats``), measured now: the
    hardware-limit column divides a stage's FLOPs by it."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, warmup=1, repeats=repeats)
    return 2 * n**3 / timing.median_s / 1e9


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn`` as counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
