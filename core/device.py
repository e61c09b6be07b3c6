"""Where a run computes and on which path (precision, memory format, compiled or eager); giving memory back.

The paths a run may take are listed here (`candidate_paths`); which one is fastest on this machine is measured
by core/fastpath.py, never assumed from CPU flags: of two 2-core Intel Xeons with AVX512_BF16, one trained the
cpu preset's model in bf16 1.3x slower than in fp32, the other (with AMX-BF16) 2.1x faster; core/fastpath.py
lists what each machine measured.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import platform
import shutil
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


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo; the platform's processor string elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


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


@dataclass(frozen=True)
class ExecPath:
    """How a run computes on its device: autocast dtype, memory format, and whether G and D are compiled.

    train.amp, train.channels_last and train.compile with `auto` resolved (core/fastpath.py measures which path
    is fastest here). The arithmetic differs between paths only by rounding; what a run learns does not.
    """
    amp: str  # bf16 | fp32: the autocast dtype of G and D
    channels_last: bool  # NHWC models and images
    compile: bool = False  # torch.compile'd G and D for the training steps (R1's double backward stays eager)

    @property
    def name(self) -> str:
        return f"{self.amp}+{'NHWC' if self.channels_last else 'NCHW'}+{'compiled' if self.compile else 'eager'}"

    @classmethod
    def parse(cls, name: str) -> "ExecPath":
        """The inverse of `name`: 'bf16+NHWC+eager' -> ExecPath('bf16', True, False)."""
        amp, layout, mode = name.split("+")
        if amp not in ("bf16", "fp32") or layout not in ("NHWC", "NCHW") or mode not in ("eager", "compiled"):
            raise ValueError(f"not a path name: {name!r}")
        return cls(amp, layout == "NHWC", mode == "compiled")

    def params(self) -> dict[str, object]:
        """As the run's MLflow params, beside the config's derived values."""
        return {"derived.amp": self.amp, "derived.channels_last": self.channels_last, "derived.compile": self.compile}


def candidate_paths(train: TrainConfig, can_compile: bool = True) -> list[ExecPath]:
    """Every path train.amp / channels_last / compile allow: an explicit value
    fixes its dimension, `auto` leaves both choices open (compiled ones only where torch.compile can run)."""
    amps = ("bf16", "fp32") if train.amp == "auto" else (train.amp,)
    layouts = (True, False) if train.channels_last == "auto" else (train.channels_last == "on",)
    compiles = ((True, False) if can_compile else (False,)) if train.compile == "auto" else (train.compile == "on",)
    return [ExecPath(a, c, m) for m in compiles for a in amps for c in layouts]


def unmeasured_path(train: TrainConfig, kind: str) -> ExecPath:
    """A path without measuring (explicit values; for `auto` eager, and bf16 + NHWC on CUDA, fp32 NCHW on a
    CPU): for a rough timing (the ETA's probe) where measuring every path would cost more than the answer."""
    fast = kind == "cuda"
    return ExecPath(("bf16" if fast else "fp32") if train.amp == "auto" else train.amp,
                    fast if train.channels_last == "auto" else train.channels_last == "on",
                    train.compile == "on")


def release_memory(device: torch.device | str | None = None) -> None:
    """Collect what a finished run left behind and hand cached CUDA blocks back, so the next run starts empty."""
    gc.collect()
    if torch.device(device or "cpu").type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def can_compile(device: torch.device) -> bool:
    """torch.compile can run here: Triton on CUDA, a C++ compiler on a CPU (inductor writes C++)."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


# the user's own choice of inductor's cache, as this process started (importing torch._dynamo sets the variable
# to inductor's default in /tmp, so it is read here, before anything of the suite imports it)
USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def use_compile_cache(cache_dir: str) -> None:
    """Inductor's compiled kernels under the suite's cache folder (unless the user set TORCHINDUCTOR_CACHE_DIR):
    a later run, study or process with the same model compiles in seconds, not a minute. Inductor reads the
    variable whenever it looks for a kernel."""
    if USER_INDUCTOR_CACHE is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((Path(cache_dir).expanduser() / "inductor").resolve())


class _OneLine(logging.Filter):
    """Dynamo's warning about a graph it could not compile (and runs eagerly, with suppress_errors) as one line:
    the frame and the error, without the traceback of the compiler's internals."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and record.exc_info:
            exc = record.exc_info[1]
            exc = getattr(exc, "inner_exception", None) or exc  # a backend's failure, not dynamo's wrapper of it
            text = record.getMessage().strip().splitlines()
            where = text[0].replace("WON'T CONVERT", "").strip() if text else "a graph"
            record.msg, record.args, record.exc_info, record.exc_text = (
                f"torch.compile could not compile {where} ({first_line(exc) if exc else 'error'}); "
                "it runs eagerly", None, None, None)
        return True


def quiet_compile_fallback() -> None:
    """One line, not a traceback wall, when a run's compiled path falls back to eager for a graph (once per process)."""
    log = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _OneLine) for f in log.filters):
        log.addFilter(_OneLine())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
