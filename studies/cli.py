"""What every command shares: the common flags, config overrides from them, where data is looked for, one guard.

    python -m studies.run pooling --preset quick --data ~/celeba --set train.kimg=50 --tracking-uri sqlite:///x.db
    python -m studies.search --preset quick --data ~/celeba/img_align_celeba.zip --set train.kimg=50 --no-progress
    python -m studies.report pooling --tracking-uri sqlite:///x.db
    python -m studies.bench --preset quick --set eval.weights=/tmp/fid/fid_inception_tf.pt

Each command's main() is `command(build_parser, body)`: it parses the arguments and runs the body in `guard`, where
bad input (UserError) ends as one line `error: ...` on stderr and exit code 2, and Ctrl-C as exit code 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from core.config import PRESETS, parse_set
from core.errors import UserError
from core.tracking import DEFAULT_URI
from studies.lr_handoff import DEFAULT_STORAGE

REPO = Path(__file__).resolve().parents[1]


def data_roots() -> list[Path]:
    """Where CelebA is looked for when --data is not given, in order; the first that holds images is used."""
    env = [Path(os.environ["CELEBA_ROOT"]).expanduser()] if os.environ.get("CELEBA_ROOT") else []
    return env + [Path("data/celeba"), REPO / "data/celeba", REPO.parent / "shared/data/celeba-subset"]


FLAGS: dict[str, dict[str, object]] = {  # flag -> argparse keywords: one definition and one help text each
    "--preset": {"default": "auto",
                 "help": f"config preset: auto | {' | '.join(PRESETS)} (default: auto = 'default', the 128 px GPU "
                 "preset, with CUDA, else 'cpu', the 32 px CPU preset; 'quick' is for tests and --smoke)"},
    "--data": {"default": None, "help": "CelebA folder, img_align_celeba.zip, or 'torchvision' (default: the first "
               "that holds images of $CELEBA_ROOT, ./data/celeba, data/celeba in the checkout, then "
               "../shared/data/celeba-subset beside the checkout)"},
    "--set": {"action": "append", "default": [], "metavar": "KEY=VALUE",
              "help": "override any config key, e.g. --set train.kimg=500 (repeatable; default: none)"},
    "--tracking-uri": {"default": None,
                       "help": f"MLflow store (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI} here)"},
    "--storage": {"default": DEFAULT_STORAGE, "help": "Optuna storage: SQLAlchemy URL (sqlite:///FILE.db, "
                  f"postgresql://USER@HOST/DB), journal:PATH or PATH.journal (default: {DEFAULT_STORAGE})"},
    "--no-progress": {"action": "store_true", "help": "no progress bars (default: shown)"},
}


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str) -> None:
    """Add the named shared flags (keys of FLAGS), each with its one help text."""
    for name in names:
        parser.add_argument(name, **FLAGS[name])


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    """Config overrides from --set KEY=VALUE (in order), then --data as data.root."""
    overrides: dict[str, object] = dict(parse_set(args.set))
    if args.data is not None:
        overrides["data.root"] = args.data
    return overrides


def parse_base(items: list[str]) -> tuple[tuple[str, str], ...]:
    """--base ABLATION=VARIANT flags (studies.run and studies.search) as (ablation, variant) pairs."""
    pairs = []
    for item in items:
        name, eq, variant = item.partition("=")
        if not eq:
            raise UserError(f"--base expects ABLATION=VARIANT, got '{item}'")
        pairs.append((name.strip(), variant.strip()))
    return tuple(pairs)


def command(build_parser: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], int | None],
            interrupted: str = "interrupted") -> Callable[[list[str] | None], int]:
    """A command's main(argv=None): parse the arguments (args.argv keeps them as given), then body(args) in guard."""
    def main(argv: list[str] | None = None) -> int:
        args = build_parser().parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else list(argv)
        return guard(lambda: body(args), interrupted)
    return main


def guard(body: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a command's body; its exit code (None = 0), 2 after `error: ...` for bad input, 130 on Ctrl-C."""
    try:
        return body() or 0
    except UserError as exc:
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def start_workers(n: int, target: Callable, args: Callable[[int], tuple], name: str,
                  kwargs: dict | None = None) -> list:
    """Start n spawned local worker processes (fresh interpreters: no forked torch threads or open database
    connections), `target(*args(i), **kwargs)` in worker i. With CUDA each worker sees one GPU, i mod the count,
    as cuda:0 (so a run's config, and its key, is the same on every GPU); on a CPU each runs cores/n torch threads,
    so n workers share the cores instead of each spinning on all of them."""
    import multiprocessing as mp

    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = 0 if gpus else max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")
    procs = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for i in range(n):
            if gpus:  # read by the child at start-up, so set around its start only
                os.environ["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            proc = ctx.Process(target=_in_worker, args=(threads, target, args(i), kwargs or {}), name=f"{name}-{i}")
            proc.start()
            procs.append(proc)
    except BaseException:  # one failed to start (or Ctrl-C): stop the ones already started
        for proc in procs:
            proc.terminate()
            proc.join()
        raise
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return procs


def _in_worker(threads: int, target: Callable, args: tuple, kwargs: dict) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)
    target(*args, **kwargs)


def join_all(procs: list) -> None:
    """Wait for every started worker process; on any way out (Ctrl-C included), stop the ones still running."""
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
