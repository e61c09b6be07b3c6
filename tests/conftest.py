"""Shared fixtures: tiny configs, synthetic and real CelebA folders, a throwaway MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import config as config_mod

REPO = Path(__file__).resolve().parents[1]
# the real subset beside the checkout (../shared), wherever the checkout was cloned to
_CANDIDATES = [os.environ.get("CELEBA_SUBSET", ""), str(REPO.parent / "shared/data/celeba-subset"),
               "/work/shared/data/celeba-subset"]
REAL_CELEBA = next((Path(c) / "img_align_celeba" for c in _CANDIDATES if c and (Path(c) / "img_align_celeba").is_dir()),
                   REPO.parent / "shared/data/celeba-subset/img_align_celeba")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # workers share the cores: more threads than cores only spin
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
# one path, nothing measured: fp32 eager NCHW. Also for tests about kills and records on the quick preset, whose
# bf16 + NHWC steps take 2.5-4x as long on a CPU without AVX512_BF16 (batch 8: 70 against 28 ms, 2026-12-01, AMD EPYC)
FP32_EAGER = {"train.amp": "fp32", "train.channels_last": "off", "train.compile": "off"}
TINY = {  # 32x32, narrow, a handful of steps: seconds on two CPU cores
    "model.resolution": 32, "model.width": 0.125, "train.device": "cpu", **FP32_EAGER,
    "train.batch_size": 8, "train.kimg": 0.032, "train.log_every_kimg": 0.008, "train.sample_every_kimg": 0.016,
    "train.checkpoint_every_kimg": 0.016, "optim.lr_ref_batch": 8,
    "eval.fid_every_kimg": 0.0, "eval.fid_samples": 16, "eval.fid_final_samples": 16,
    "eval.fid_ref_images": 32, "eval.fid_batch": 16, "eval.grid_size": 4, "eval.collapse_nn_ratio": 0.0,
}


def write_synthetic_celeba(folder: Path, n: int, seed: int = 0) -> Path:
    """n random 178x218 JPEGs in the aligned-CelebA layout (smooth blobs, so JPEG keeps them cheap)."""
    img_dir = folder / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (7, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((178, 218), Image.BILINEAR).save(img_dir / f"{i + 1:06d}.jpg", quality=90)
    return folder


def step_losses(trainer, steps: int) -> list[tuple[float, float]]:
    """(loss/d, loss/g) of each of `steps` training steps, read one step at a time."""
    out = []
    for _ in range(steps):
        trainer.train_step()
        stats = trainer.read_stats()
        out.append((stats["loss/d"], stats["loss/g"]))
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return write_synthetic_celeba(tmp_path_factory.mktemp("celeba"), 48)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_cfg(synthetic_root, cache_dir):
    def make(**overrides) -> config_mod.RunConfig:
        layer = {**TINY, "data.root": str(synthetic_root), "data.cache_dir": str(cache_dir)}
        layer.update({k.replace("__", "."): v for k, v in overrides.items()})
        return config_mod.resolve("default", layer)
    return make


@pytest.fixture
def real_celeba() -> Path:
    if not REAL_CELEBA.is_dir():
        pytest.skip(f"real CelebA subset not found at {REAL_CELEBA}")
    return REAL_CELEBA


@pytest.fixture
def store(tmp_path, monkeypatch, _migrated_mlflow_db):
    """An empty MLflow store at tmp_path/mlflow.db (schema already made), tmp_path the working directory."""
    import shutil
    from core.tracking import Store
    monkeypatch.chdir(tmp_path)
    return Store(f"sqlite:///{shutil.copy(_migrated_mlflow_db, tmp_path / 'mlflow.db')}")


def _blank_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 1)).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _blank_pictures():
    """Every run ends by drawing its curves, and every report its pictures, with matplotlib (0.4 s a run and ~1 s a
    report on a 2-core AMD EPYC; this suite trains ~160 runs and writes ~70 reports in its own processes): blank
    PNGs of the same names stand in, for module fixtures too. Tests marked `pictures` draw the real ones, and so
    does tests/test_report.py's study. Yields the real (plot_run_curves, report plots' _save)."""
    import core.runner
    import studies.report.plots as report_plots
    real = core.runner.plot_run_curves, report_plots._save

    def no_figure(fig, path: Path) -> Path:
        report_plots._plt().close(fig)
        return _blank_png(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core.runner, "plot_run_curves", lambda log, path, sample_counts, title="": _blank_png(path))
        mp.setattr(report_plots, "_save", no_figure)
        yield real


def draw_pictures(mp: pytest.MonkeyPatch, real) -> None:
    """Put the real drawing back within `mp` (real: what _blank_pictures yields)."""
    import core.runner
    import studies.report.plots as report_plots
    mp.setattr(core.runner, "plot_run_curves", real[0])
    mp.setattr(report_plots, "_save", real[1])


@pytest.fixture(autouse=True)
def _real_pictures_where_marked(request, monkeypatch, _blank_pictures):
    if request.node.get_closest_marker("pictures"):
        draw_pictures(monkeypatch, _blank_pictures)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema made once: a fresh store spends seconds in migrations."""
    from core.tracking import Store
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    Store(f"sqlite:///{path}")
    return path


@pytest.fixture
def empty_store_db(_migrated_mlflow_db, tmp_path) -> Path:
    """tmp_path/mlflow.db: an empty, already migrated MLflow store (the commands' default store in tmp_path)."""
    import shutil
    return Path(shutil.copy(_migrated_mlflow_db, tmp_path / "mlflow.db"))


def pytest_collection_finish(session):
    """Every module of the suite is imported now: freeze those objects out of the garbage collector's sight. Each
    run ends in core.device.release_memory, whose gc.collect() would otherwise walk all ~400,000 objects of torch,
    MLflow, pandas and the tests every time (0.4 s; 250 times a suite, 2026-12-01, AMD EPYC)."""
    import gc
    gc.collect()
    gc.freeze()
