"""Where and with what a study ran: git commit, package versions, host and accelerator, as parent-run tags.

Recorded when the study starts, so a report rebuilt months later still names the code and the machine
that produced its numbers (the report reads these tags back; it never inspects the machine it runs on).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "mlflow", "optuna", "numpy", "clean-fid", "pandas")
PREFIX = "env."  # every provenance tag starts with this, so the report can list them without knowing them


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _accelerator() -> dict[str, str]:
    import torch
    if not torch.cuda.is_available():
        return {"device": "cpu", "cuda": "none"}
    return {"device": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda),
            "gpus": str(torch.cuda.device_count())}


def provenance() -> dict[str, str]:
    """Tags naming the code (git commit, dirty flag), Python and package versions, host and accelerator."""
    commit = _git("rev-parse", "HEAD")
    # only tracked files count as dirty: run outputs (mlflow.db, runs/) are untracked or ignored
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    tags = {"git_commit": commit or "unknown", "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
            "python": platform.python_version(), "platform": platform.platform(terse=True),
            "hostname": socket.gethostname(), "cpu_count": str(os.cpu_count() or 0), "argv": " ".join(sys.argv)[:500]}
    tags.update({p: _version(p) for p in PACKAGES})
    tags.update(_accelerator())
    return {PREFIX + k: v for k, v in tags.items()}


def study_note(experiment: str, variants: list[str], seeds: tuple[int, ...]) -> str:
    """The parent run's MLflow description: what the study is and how to compare its runs in the UI."""
    return (f"Ablation study **{experiment}**: variants {', '.join(variants)} (baseline first) x seeds "
            f"{', '.join(map(str, seeds))}. Child runs are named VARIANT-sSEED and tagged `variant` and `seed`; "
            "tick them and press Compare, or group the runs table by the `variant` tag. "
            f"The report is `python -m studies.report {experiment}`.")
