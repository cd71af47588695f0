"""The device and precision policy: which device runs fovea, in which dtype, with how many threads.

One place decides, from what the hardware has: ``device="auto"`` is CUDA when present, else the CPU;
``dtype="auto"`` is bf16 on CUDA devices that support it and on CPUs with native bf16 units (AMX or avx512_bf16),
fp32 elsewhere. A CPU without those units emulates bf16 (measured on an AVX2-only EPYC: a bf16 matmul ran ~45x
*slower* than fp32), so asking for bf16 there is an error, not a silent slowdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native bf16 instruction sets (AMX, avx512_bf16) as the kernel reports them; empty elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in _CPU_BF16_FLAGS if f in flags)
    return ()


def cpu_supports_bf16() -> bool:
    return bool(cpu_bf16_flags())


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when present, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` are checked
    against what this machine has (ValueError naming what is available)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported; available: {available_devices()}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available: no CUDA device on this machine; available: cpu")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist; available: {available_devices()}")
    return torch.device("cuda", index)


def dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"dtype {dtype} is not one of {sorted(DTYPES)}")
    return _ALIASES.get(dtype, dtype)


def supported_dtypes(device: torch.device) -> list[str]:
    """The dtypes fovea runs in on ``device``: fp32 everywhere; bf16 where the hardware computes it natively;
    fp16 on CUDA only (CPU fp16 kernels are emulated)."""
    if device.type == "cuda":
        out = ["float32", "float16"]
        if torch.cuda.is_bf16_supported():
            out.insert(1, "bfloat16")
        return out
    return ["float32", "bfloat16"] if cpu_supports_bf16() else ["float32"]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 where ``device`` computes it natively, else fp32; an explicit dtype the device cannot run
    fast is a ValueError naming the dtype, the device and what it supports."""
    supported = supported_dtypes(device)
    if dtype is None or dtype == "auto":
        return DTYPES["bfloat16" if "bfloat16" in supported else "float32"]
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not known; use auto or one of {sorted(DTYPES)}")
    if name not in supported:
        why = ""
        if device.type == "cpu" and name == "bfloat16":
            why = " (this CPU has no AMX or avx512_bf16 units; bf16 would be emulated and slower than fp32)"
        elif device.type == "cpu" and name == "float16":
            why = " (float16 is for GPUs)"
        raise ValueError(f"dtype {name!r} is not supported on device {str(device)!r}{why}; supported: {supported}")
    return DTYPES[name]


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None`` keeps torch's choice, the physical cores); returns the count used."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class Placement:
    """Where and in what precision one run computes."""

    device: torch.device  # the device every stage runs on
    dtype: torch.dtype  # compute dtype of the model's weights (the KV cache follows the LLM)
    threads: int  # torch intra-op threads (CPU)

    def describe(self) -> str:
        return f"{self.device} {dtype_name(self.dtype)} threads={self.threads}"


def placement(device: str | None = "auto", dtype: str | None = "auto", threads: int | None = None) -> Placement:
    """Resolve ``device``, ``dtype`` and ``threads`` together, before any model is built."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    return Placement(device=dev, dtype=dt, threads=configure_threads(threads))
