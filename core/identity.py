"""What makes two runs the same run: a content key over everything that decides a finished run's result.

Two runs with one key train the same model on the same data with the same code and are scored the same way, so
a study that needs a run the store already holds under its key can reuse it instead of training it again
(studies/run/study.py). The key covers:
- the resolved config with its seed (paths of this machine aside: the data's content is the data key);
- the data key (core.data: which images, decoded how);
- the metric protocol where the run is scored (its version, the resize and the Inception weights' digest; the
  sample counts are config);
- the trainer hooks, by class and state (an ablation may change a run through them instead of config);
- a digest of core's sources, the code that trains and scores: any edit of core/ starts new keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from core import config as config_mod
from core.config import RunConfig
from core.inception import PROTOCOL_VERSION, RESIZES, find_weights, weights_digest

CORE = Path(__file__).resolve().parent
MACHINE_KEYS = ("data.root", "data.cache_dir")  # where this machine keeps the data, not what the data is


@functools.cache
def code_digest() -> str:
    """sha1 of every module of core/ (names and bytes), 16 hex digits: read once per process."""
    h = hashlib.sha1()
    for path in sorted(CORE.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _hook(hook: object) -> str:
    state = {k: repr(v) for k, v in sorted(vars(hook).items())} if hasattr(hook, "__dict__") else {}
    return f"{type(hook).__module__}.{type(hook).__qualname__}{json.dumps(state, sort_keys=True)}"


def run_key(cfg: RunConfig, data_key: str, hooks: Sequence[object] = ()) -> str:
    """The content key of a run of `cfg` (its seed included) on the images of `data_key` under `hooks`."""
    e = cfg.eval
    protocol = ({"version": PROTOCOL_VERSION, "resize": RESIZES[e.fid_resize],
                 "weights": weights_digest(find_weights(e.weights))} if e.fid_final_samples > 0 else {})
    config = {k: v for k, v in config_mod.flatten(cfg).items() if k not in MACHINE_KEYS}
    blob = json.dumps({"config": config, "data": data_key, "protocol": protocol, "hooks": [_hook(h) for h in hooks],
                       "code": code_digest()}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]
