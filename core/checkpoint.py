"""Checkpoint files: a state dict written atomically and read back onto the CPU; what goes in is the trainer's business.

Read onto the CPU: Trainer.load_state_dict moves weights and optimizer state to where the models are, and RNG states
must stay CPU ByteTensors (map_location=cuda would break resume on a GPU). weights_only=True: a checkpoint holds
tensors, numbers, strings, lists and dicts, never pickled objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from core.errors import UserError


def write(state: dict, path: Path) -> Path:
    """Write atomically (temporary file, then rename): a kill never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read(path: Path) -> dict:
    """The state dict saved at `path`, on the CPU; a UserError when the file cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
