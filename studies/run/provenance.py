"""Where and with what a study ran: git commit, package versions, host and accelerator, as parent-run tags.

    python -m studies.run pooling    # its parent run gets env.git_commit, env.torch, env.command, ... tags

Recorded when the study starts, so a report rebuilt months later still names the code and the machine
that produced its numbers (the report reads these tags back; it never inspects the machine it runs on).
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from studies.mlflow_view import view_key

REPO = Path(__file__).resolve().parents[2]
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
    build = {"torch": torch.__version__}  # with its build suffix (+cu130, +cpu), which the wheel metadata lacks
    if not torch.cuda.is_available():
        return {**build, "device": "cpu", "cuda": "none"}
    return {**build, "device": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda),
            "gpus": str(torch.cuda.device_count())}


def _command() -> str:
    """The command line as the user typed it: `python -m studies.run ...` rather than the module's file path."""
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    command = prog.name == "__main__.py" and prog.parent.parent.name == "studies"  # studies/COMMAND/__main__.py
    head = f"python -m studies.{prog.parent.name}" if command else prog.name
    return " ".join([head, *map(shlex.quote, sys.argv[1:])])[:500]


CODE_PATHS = ("core", "ablations", "studies", "pyproject.toml")  # what trains, scores and reports a run


def provenance() -> dict[str, str]:
    """Tags naming the code (git commit, dirty flag), Python and package versions, host and accelerator."""
    commit = _git("rev-parse", "HEAD")
    # only edits of the code count as dirty: not run outputs (mlflow.db, runs/), nor the reports a study rewrites
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS) if commit else None
    tags = {"git_commit": commit or "unknown", "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
            "python": platform.python_version(), "platform": platform.platform(terse=True),
            "hostname": socket.gethostname(), "cpu_count": str(os.cpu_count() or 0), "command": _command()}
    tags.update({p: _version(p) for p in PACKAGES})
    tags.update(_accelerator())
    return {PREFIX + k: v for k, v in tags.items()}


def study_note(experiment: str, variants: list[str], seeds: tuple[int, ...],
               baseline_seeds: tuple[int, ...] = ()) -> str:
    """The parent run's MLflow description: what the study is and how to compare its runs in the UI."""
    more = f" (the baseline: seeds {', '.join(map(str, baseline_seeds))})" if len(baseline_seeds) > len(seeds) else ""
    return (f"Ablation study **{experiment}**: variants {', '.join(variants)} (baseline first) x seeds "
            f"{', '.join(map(str, seeds))}{more}. Child runs are named VARIANT-sSEED and tagged `variant` and `seed`; "
            f"the saved view `{view_key('<this run id>')}` groups them by variant. "
            f"Report: `python -m studies.report {experiment}`.")
