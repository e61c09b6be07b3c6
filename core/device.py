"""Where a run computes and in which precision and memory format; and giving a finished run's memory back.

`train.amp=auto` and `train.channels_last=auto` pick the fast path the hardware has: bf16 autocast and NHWC
on CUDA, and on a CPU with native bf16 arithmetic (AVX512_BF16 or AMX); plain fp32 NCHW elsewhere, where bf16
would be emulated and slower than fp32.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import TrainConfig
from core.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device='{name}' is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device asks for CUDA but no GPU is visible; use --set train.device=cpu")
    return device


def choose_preset(name: str) -> tuple[str, str]:
    """(preset, why) for --preset: 'auto' is the GPU preset with CUDA and the CPU preset without."""
    if name != "auto":
        return name, "asked for with --preset"
    if torch.cuda.is_available():
        return "default", f"CUDA device {torch.cuda.get_device_name()} found: the 128 px GPU preset"
    return "cpu", "no CUDA device, so the 32 px CPU preset; --preset default is the 128 px GPU one"


def device_type(name: str) -> str:
    """'cuda' or 'cpu' for a train.device value, without raising (validation is pick_device's job)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512_BF16, or AMX whose tiles come with AMX-BF16).

    Asked through torch.cpu's CPUID probes (cpuinfo, any OS); where a torch lacks them, the Linux kernel's
    flags in /proc/cpuinfo. Not oneDNN's own bf16 check: that also says yes on plain AVX-512, where bf16 is
    emulated and slower than fp32.
    """
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(amp: str, channels_last: str, kind: str) -> tuple[str, bool]:
    """(autocast dtype name, NHWC?) actually used for train.amp / train.channels_last on a 'cuda' or 'cpu' device."""
    fast = kind == "cuda" or cpu_has_native_bf16()
    return (("bf16" if fast else "fp32") if amp == "auto" else amp,
            fast if channels_last == "auto" else channels_last == "on")


@dataclass(frozen=True)
class Precision:
    """What a run computes in on its device: train.amp and train.channels_last with `auto` resolved."""
    amp: str  # bf16 | fp32: the autocast dtype of G and D
    channels_last: bool  # NHWC models and images

    def params(self) -> dict[str, object]:
        """As the run's MLflow params, beside the config's derived values."""
        return {"derived.amp": self.amp, "derived.channels_last": self.channels_last}


def run_precision(train: TrainConfig, device: torch.device) -> Precision:
    """The precision a run of `train` uses on `device` (the machine is asked here, never by the config)."""
    return Precision(*resolve_precision(train.amp, train.channels_last, device.type))


def release_memory(device: torch.device | str | None = None) -> None:
    """Collect what a finished run left behind and hand cached CUDA blocks back, so the next run starts empty."""
    gc.collect()
    if torch.device(device or "cpu").type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
