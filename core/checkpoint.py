"""A trainer's checkpoint: everything a resumed run needs to continue exactly, written atomically.

G, D, G_ema, both optimizers, step, images seen, every RNG (z, batches, augmentation, torch, CUDA), hook
state, the loss sums since the last log point and the MLflow run id. Loaded onto the CPU: load_state_dict
moves weights and optimizer state to where the models are, and RNG states must stay CPU ByteTensors
(map_location=cuda would break resume on a GPU). `t` below is a core.trainer.Trainer, not imported here: the
trainer imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path
import torch

from core import config as config_mod
from core.errors import UserError


def trainer_state(t) -> dict:
    """The trainer's whole state as plain tensors, numbers and dicts (torch.load(weights_only=True) reads it)."""
    return {
        "config": config_mod.flatten(t.cfg), "step": t.step, "nimg": t.nimg,
        "G": t.G.state_dict(), "D": t.D.state_dict(), "G_ema": t.G_ema.state_dict() if t.G_ema is not None else {},
        "opt_g": t.opt_g.state_dict(), "opt_d": t.opt_d.state_dict(),
        "batches": t.batches.state_dict(), "zgen": t.zgen.get_state(), "augment_gen": t.augment_gen.get_state(),
        "torch_rng": torch.get_rng_state(), "hooks": t.hooks.state_dict(),
        "cuda_rng": torch.cuda.get_rng_state_all() if t.device.type == "cuda" else [],
        "fid_history": [[k, v] for k, v in t.fid_history.items()],
        "history": {k: [[n, v] for n, v in pts] for k, pts in t.history.items()},
        "phase_steps": dict(t.phase_steps), "run_id": t.tracker.run_id or "",
        "failures": dict(t.failures), "saturated_logs": t._saturated_logs,
        "saturation": {"episodes": [list(ep) for ep in t.saturation_episodes], "since": t._stuck_since},
        "evals": [list(ev) for ev in t.evals],
        # the running sums since the last log: a resume between two log points logs the same means
        "stats": {"acc": dict(t._acc), "count": dict(t._count)},
    }


def load_trainer_state(t, state: dict) -> None:
    """Restore what trainer_state saved; a checkpoint made with another config is refused, naming the keys."""
    ours = config_mod.flatten(t.cfg)
    theirs = state["config"]
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (now {ours[k]!r})" for k in differ[:4])
        raise UserError(f"checkpoint was made with a different config: {shown}; "
                        "delete the run directory or rerun with the same settings")
    t.step, t.nimg = state["step"], state["nimg"]
    t.G.load_state_dict(state["G"])
    t.D.load_state_dict(state["D"])
    if t.G_ema is not None:
        t.G_ema.load_state_dict(state["G_ema"])
    t.opt_g.load_state_dict(state["opt_g"])
    t.opt_d.load_state_dict(state["opt_d"])
    # RNG states stay CPU ByteTensors (set_state refuses anything else, also for CUDA generators)
    t.batches.load_state_dict(state["batches"])
    t.zgen.set_state(state["zgen"])
    t.augment_gen.set_state(state["augment_gen"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    t.hooks.load_state_dict(state["hooks"])
    t.fid_history = {int(k): float(v) for k, v in state["fid_history"]}
    t.history = {k: [(int(n), float(v)) for n, v in pts] for k, pts in state["history"].items()}
    t.phase_steps = {k: int(v) for k, v in state["phase_steps"].items()}
    t.failures, t._saturated_logs = dict(state["failures"]), state["saturated_logs"]
    t.saturation_episodes = [list(ep) for ep in state["saturation"]["episodes"]]
    t._stuck_since = state["saturation"]["since"]
    t.evals = [(str(f), int(n), int(k), float(v)) for f, n, k, v in state["evals"]]
    t._acc = {k: v.to(t.device) for k, v in state["stats"]["acc"].items()}
    t._count = dict(state["stats"]["count"])


def save_checkpoint(t, path: Path) -> Path:
    """Write atomically (temporary file, then rename): a kill never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}")
    torch.save(trainer_state(t), tmp)
    os.replace(tmp, path)
    return path


def resume(t, path: Path) -> bool:
    """Continue from `path` if it exists; False when starting fresh."""
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from None
    load_trainer_state(t, state)
    return True
