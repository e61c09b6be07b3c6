"""Test helpers: a stand-in FID for tests about what happens around it (studies, resume, searches), and a
reader for the report's markdown tables."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.metrics import MetricResult, Score
from core.records import FIDELITY_DIVERSITY, NN_RATIO_KEY, SPREAD_KEY, metric_name


@functools.cache
def _decoded(data, resolution: int):
    from core.data import load_images
    return load_images(data, resolution)


def images_for(cfg):
    """cfg's images on its device, as a study shares them with each run (decoded once per test process)."""
    from core.build import share_images
    return share_images(cfg, _decoded(cfg.data, cfg.model.resolution))


def build(cfg, **kwargs):
    """build_run on cfg's shared images."""
    from core.build import build_run
    return build_run(cfg, images=images_for(cfg), **kwargs)


def g_fid(G: torch.nn.Module) -> float:
    """A 'FID' that follows G's weights: equal values mean equal generators, to float64 rounding."""
    total = sum(p.detach().double().abs().sum() for p in G.parameters())
    count = sum(p.numel() for p in G.parameters())
    return float(100 + 1e4 * total / count)


def install_fake_fid(monkeypatch, value: Callable[[object, torch.nn.Module, int], float] | None = None,
                     nn_ratio: float = 1.0) -> list[tuple[int, int]]:
    """Replace core.build.FidEvaluator (Inception, seconds per call) by a function of the run's config and G
    (and the Inception batch a study's ETA times, and the reference statistics a study computes first, by nothing).

    value(cfg, G, num_samples) -> FID (default: g_fid(G)), and KID = FID / 1000; precision, recall, density and
    coverage follow FID too (1 / (1 + FID / k) for k = 1..4), and the nearest-neighbour ratio is `nn_ratio`;
    returns the (seed, num_samples) of every evaluation.
    """
    import core.build as build
    calls: list[tuple[int, int]] = []

    class FakeFid:
        def __init__(self, cfg, images, device, progress=False):
            self.cfg = cfg
            path = Path(cfg.data.cache_dir).expanduser() / "fake-fid-reference.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"fake")
            self.ref = SimpleNamespace(path=path, key="fake")

        def __call__(self, G, num_samples):
            calls.append((self.cfg.train.seed, num_samples))
            fid = value(self.cfg, G, num_samples) if value else g_fid(G)
            kid = fid / 1000  # KID follows FID (NaN included), so either can be a study's primary metric
            fidelity_diversity = tuple(Score(m, m, 1 / (1 + fid / k)) for k, m in enumerate(FIDELITY_DIVERSITY, 1))
            return MetricResult((Score("fid", metric_name("fid", num_samples), fid),
                                 Score("kid", metric_name("kid", num_samples), kid, kid / 10), *fidelity_diversity),
                                {SPREAD_KEY: 1.0, NN_RATIO_KEY: nn_ratio}, protocol={
                "num_gen": num_samples, "num_ref": 0, "ref_key": "fake", "g_mode": self.cfg.eval.g_mode,
                "quantise": "uint8", "resize": "fake", "version": "fake"}, num_samples=num_samples)

    monkeypatch.setattr(build, "FidEvaluator", FakeFid)
    import core.reference as reference  # a study's or search's reference statistics, before its first run
    monkeypatch.setattr(reference, "ensure_reference", lambda cfg, images, progress=False: None)
    import studies.eta as eta  # the ETA of a study times an Inception batch: this FID costs nothing
    monkeypatch.setattr(eta, "_inception_img_per_s", lambda cfg, images: math.inf)
    return calls


def md_table(markdown: str, heading: str) -> dict[str, dict[str, str]]:
    """The table under `## heading`, as first cell (markup and the best-variant star stripped) -> {header: cell}."""
    import re
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    head, rows = cells[0], [row for row in cells[1:] if not set("".join(row)) <= set(":- ")]
    return {re.sub(r"[*★]|best", "", row[0]).strip(): dict(zip(head, row)) for row in rows}


def git_head() -> str:
    """HEAD of this checkout: what env.git_commit must say ('unknown' only where git cannot tell)."""
    import subprocess
    try:
        head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=30)
    except OSError:  # no git on this machine
        return "unknown"
    return head.stdout.strip() if head.returncode == 0 else "unknown"


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path, *extra: str):
    """A real `mlflow server` on 127.0.0.1 (a free port) over `backend_uri`, its log in folder/server.log; yields its
    URL once /health answers, and stops its whole process group afterwards."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import pytest
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (folder / "server.log").open("w")
    # no background job runner (seven huey consumers, for GenAI jobs): faster to start, nothing left behind;
    # its own session, so the whole process group (server, uvicorn worker) can be stopped at the end
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, *extra,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not come up: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def set_flags(overrides: dict[str, object]) -> list[str]:
    """--set KEY=VALUE flags for a command, one pair per override, in order."""
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def mlflow_search_runs(uri: str, experiment: str):
    """mlflow.search_runs on the store at `uri`, without the suite's own readers. set_tracking_uri also exports
    the URI as MLFLOW_TRACKING_URI, which a later test in this worker would take for its own store (studies.run
    would write there): the environment is put back on return."""
    import mlflow
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        return mlflow.search_runs(experiment_names=[experiment])


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a test's `python -m studies...` subprocess: this checkout importable, HOME in the test's
    folder, no MLFLOW_TRACKING_URI of the caller, and one torch thread (the test machine's cores are shared)."""
    import os
    return {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home), "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def say_threads_and_gpu(path: str) -> None:
    """A spawned worker's target (tests/test_workers_cli.py): write its torch threads and the GPU it was given."""
    import os
    Path(path).write_text(f"{torch.get_num_threads()} {os.environ.get('CUDA_VISIBLE_DEVICES')}")
