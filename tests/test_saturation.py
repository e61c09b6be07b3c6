"""D saturation: measured from the lowest loss D's targets allow, recorded as episodes, an outcome only at the end.

The watcher is fed synthetic log statistics (the trainer's own loop, with `StepStats.reduce` replaced), so D can be
made to win outright at an exact loss: for `real_0.9` that is the entropy of its targets, 0.325 nats, which the
old absolute threshold (loss/d < 0.01) could never reach.
"""

from __future__ import annotations

import json

import pytest

from core import records as rec
from core.bookkeeping import StepStats
from core.losses import min_d_loss
from core.runner import execute_run
from tests.helpers import build, images_for

REAL_09 = {"train__real_label": 0.9, "train__kimg": 0.08, "eval__saturation_logs": 3}  # 10 logs, every 8 images
FLOOR = min_d_loss("bce", 0.9, 0.0)
WINNING = {"loss/d": FLOOR + 0.002, "loss/g": 12.0, "d/real": 0.9, "d/fake": 1e-5}  # D outright, G's loss huge
HEALTHY = {"loss/d": 1.2, "loss/g": 0.9, "d/real": 0.6, "d/fake": 0.4}


def _feed(monkeypatch, pattern: list[dict[str, float]]) -> None:
    """Every trainer's log statistics come from `pattern`, one entry per log interval, instead of its step."""
    it = iter(pattern)
    monkeypatch.setattr(StepStats, "reduce", lambda self: dict(next(it)))


def test_real_09_with_d_winning_outright_is_saturated(tiny_cfg, monkeypatch):
    assert FLOOR == pytest.approx(0.325, abs=5e-4) and WINNING["loss/d"] > 0.01  # invisible to the old rule
    trainer = build(tiny_cfg(**REAL_09), with_fid=False)
    _feed(monkeypatch, [WINNING] * 10)
    result = trainer.run()
    assert result.status == "d_saturated" and result.saturation_episodes == [[8, 80]]
    assert trainer.failures == {"d_saturated": 8}
    assert [v for _, v in trainer.metric_log.series(rec.D_SATURATED)] == [1.0] * 10


def test_an_episode_that_recovers_leaves_the_run_finished(tiny_cfg, monkeypatch):
    trainer = build(tiny_cfg(**REAL_09), with_fid=False)
    _feed(monkeypatch, [WINNING] * 4 + [HEALTHY] * 6)
    result = trainer.run()
    assert result.status == "finished" and not trainer.failures
    assert result.saturation_episodes == [[8, 32]]  # opened at the 3rd stuck log, closed by the 5th log
    assert [v for _, v in trainer.metric_log.series(rec.D_SATURATED)] == [1.0] * 4 + [0.0] * 6


def test_short_streaks_are_no_episode_and_only_the_last_episode_decides(tiny_cfg, monkeypatch):
    trainer = build(tiny_cfg(**REAL_09), with_fid=False)
    _feed(monkeypatch, [WINNING] * 2 + [HEALTHY] + [WINNING] * 3 + [HEALTHY] + [WINNING] * 3)
    result = trainer.run()
    assert result.saturation_episodes == [[32, 48], [64, 80]]
    assert result.status == "d_saturated" and trainer.failures == {"d_saturated": 64}


def test_label_smoothing_at_the_floor_is_not_saturated_without_g_exploding(tiny_cfg, monkeypatch):
    trainer = build(tiny_cfg(**REAL_09), with_fid=False)
    _feed(monkeypatch, [{**WINNING, "loss/g": 2.0}] * 10)  # D at its floor, G still learning: no failure
    assert trainer.run().status == "finished" and not trainer.saturation.episodes


def test_episodes_survive_a_resume(tiny_cfg, monkeypatch, tmp_path):
    cfg = tiny_cfg(**REAL_09)
    first = build(cfg, with_fid=False, run_dir=tmp_path)
    _feed(monkeypatch, [WINNING] * 10)
    for _ in range(4):  # 4 steps of batch 8: 4 logs, an episode open since 8 images
        first.train_step()
        first.saturation.observe(first.read_stats(), first.nimg)
    first.save_checkpoint()
    second = build(cfg, with_fid=False, run_dir=tmp_path)
    assert second.try_resume() and second.saturation.episodes == [[8, 32]]
    _feed(monkeypatch, [WINNING] * 6)
    assert second.run().status == "d_saturated" and second.saturation.episodes == [[8, 80]]


def test_episodes_and_the_flag_are_recorded_on_the_run(tiny_cfg, store, tmp_path, monkeypatch):
    cfg = tiny_cfg(**REAL_09)
    _feed(monkeypatch, [WINNING] * 4 + [HEALTHY] * 6)
    tracker = store.start_run("saturation-test", "one", {"variant": "real_0.9"})
    execute_run(cfg, tracker, tmp_path / "run", images=images_for(cfg), with_fid=False)
    tracker.finish()
    run = store.client.get_run(tracker.run_id)
    assert run.data.tags["outcome"] == "finished" and json.loads(run.data.tags["saturation_episodes"]) == [[8, 32]]
    flags = store.client.get_metric_history(tracker.run_id, "d/saturated")
    assert [(m.step, m.value) for m in flags][:5] == [(8, 1.0), (16, 1.0), (24, 1.0), (32, 1.0), (40, 0.0)]
