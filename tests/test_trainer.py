import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from core import checkpoint
from core import records as rec
from core.bookkeeping import MetricLog, SaturationWatch, StepStats
from core.errors import UserError
from core.plots import panels
from core.runner import execute_run
from core.tracking import NullTracker
from tests.helpers import build, images_for, install_fake_fid


def test_a_few_cpu_steps_give_finite_losses_and_count_images(tiny_cfg):
    trainer = build(tiny_cfg(), with_fid=False)
    before = [p.detach().clone() for p in trainer.G.parameters()]
    result = trainer.run()
    assert result.status is rec.Outcome.FINISHED and result.step == 4 and result.nimg == 32
    assert trainer.d_steps == 4 and trainer.g_steps == 4
    for key in (*rec.LOSS_KEYS, *rec.D_KEYS, rec.IMG_PER_S):
        assert [n for n, _ in trainer.metric_log.series(key)] == [8, 16, 24, 32], key
        assert all(math.isfinite(v) for _, v in trainer.metric_log.series(key)), key
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.G.parameters()))


@pytest.mark.pictures
def test_run_is_recorded_in_mlflow(tiny_cfg, store, tmp_path):
    cfg = tiny_cfg()
    tracker = store.start_run("trainer-test", "one", {"variant": "baseline"})
    result = execute_run(cfg, tracker, tmp_path / "run", images=images_for(cfg))
    tracker.finish()
    run = store.client.get_run(tracker.run_id)
    assert run.data.params["model.resolution"] == "32" and run.data.params["train.batch_size"] == "8"
    assert run.data.params["derived.steps"] == "4" and run.data.params["dataset.images"] == "48"
    # the path the trainer ran on is logged beside the config's derived values (tests/test_fastpath.py: auto)
    assert run.data.params["derived.amp"] == "fp32" and run.data.params["train.amp"] == "fp32"
    assert run.data.params["derived.channels_last"] == "False" and run.data.params["derived.compile"] == "False"
    assert run.data.params["derived.path_source"] == "explicit"
    assert run.data.tags["outcome"] == "finished"
    assert run.data.tags["fid_protocol.num_gen"] == "16"
    assert run.data.metrics["fid/final"] == pytest.approx(result.final["fid"])
    assert run.data.metrics["kid/final"] == pytest.approx(result.final["kid"])
    assert run.data.metrics["fid/best"] == pytest.approx(result.best["fid"])  # no training evaluation: the final
    assert [m.step for m in store.client.get_metric_history(tracker.run_id, "loss/d")] == [8, 16, 24, 32]
    artifacts = {a.path for a in store.client.list_artifacts(tracker.run_id)}
    assert {"config.json", "checkpoints", "plots", "samples", "summary.json"} <= artifacts
    assert "fid_reference" not in artifacts  # which run holds the reference is the study's or the search's call
    # the run's curves: one row of panels (losses, D outputs, FID, KID), 4.2 x 3.2 inches each at 100 dpi
    curves = Image.open(store.download(tracker.run_id, "plots/curves.png", tmp_path / "dl"))
    assert curves.size == (round(4.2 * 100) * len(panels([16])), round(3.2 * 100))
    summary = json.loads(store.download(tracker.run_id, "summary.json", tmp_path / "dl").read_text())
    assert set(summary) == {"status", "step", "nimg", "final", "best", "primary_metric", "diverged_at_nimg",
                            "saturation_episodes", "d_steps", "g_steps"}
    assert summary["status"] == "finished" and summary["final"] == result.final and summary["best"] == result.best
    assert store.list_artifacts(tracker.run_id, "samples") == [  # every 0.016 kimg, each its own file
        "samples/fakes000000.016kimg.png", "samples/fakes000000.032kimg.png"]


def test_resumed_run_continues_exactly_where_it_stopped(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    straight = build(cfg, with_fid=False, run_dir=tmp_path / "a")
    straight.run()

    first = build(cfg, with_fid=False, run_dir=tmp_path / "b")
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    second = build(cfg, with_fid=False, run_dir=tmp_path / "b")
    assert second.try_resume() and second.step == 2 and second.nimg == 16
    second.run()
    for a, b in zip(straight.G.state_dict().values(), second.G.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.D.state_dict().values(), second.D.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_from_another_config_is_refused(tiny_cfg, tmp_path):
    first = build(tiny_cfg(), with_fid=False, run_dir=tmp_path)
    first.train_step()
    first.save_checkpoint()
    other = build(tiny_cfg(optim__lr_d=1e-3), with_fid=False, run_dir=tmp_path)
    with pytest.raises(UserError, match="optim.lr_d"):
        other.try_resume()


def test_non_finite_loss_stops_the_run_as_diverged(tiny_cfg):
    trainer = build(tiny_cfg(), with_fid=False)
    with torch.no_grad():
        for p in trainer.D.parameters():
            p.fill_(float("nan"))
    result = trainer.run()
    assert result.status is rec.Outcome.DIVERGED and result.diverged_at == 8 and result.step == 1


class Killed(Exception):
    pass


class Recorder(NullTracker):
    """A tracker that keeps every log_metrics call, as (step, metrics)."""

    def __init__(self):
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def without_timing(logged: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
    """Logged points without the wall-clock rate (perf/img_per_s), which no two runs share."""
    return [(step, {k: v for k, v in m.items() if k != rec.IMG_PER_S}) for step, m in logged]


def test_a_kill_between_two_log_points_resumes_bit_identical(tiny_cfg, tmp_path, monkeypatch):
    """Logs and evaluations at steps 2 and 4, a checkpoint at step 3, the end at step 6: killed right after that
    checkpoint, the run resumes with the loss sums of step 3 (partial: the mean logged at step 4 spans the kill),
    what it logged so far and every RNG, and ends as the uninterrupted run: same weights, same logged values."""
    install_fake_fid(monkeypatch)  # a 'FID' that follows G's weights
    cfg = tiny_cfg(train__kimg=0.048, train__log_every_kimg=0.016, train__checkpoint_every_kimg=0.024,
                   eval__fid_every_kimg=0.016)
    straight_log = Recorder()
    straight = build(cfg, tracker=straight_log, run_dir=tmp_path / "a")
    want = straight.run()

    killed_log = Recorder()  # the killed run and its resumption, one tracker as in one MLflow run
    first = build(cfg, tracker=killed_log, run_dir=tmp_path / "b")
    save = first.save_checkpoint

    def save_then_die():
        save()
        raise Killed  # the process dies right after writing the checkpoint

    first.save_checkpoint = save_then_die
    with pytest.raises(Killed):
        first.run()
    assert first.step == 3
    state = checkpoint.read(tmp_path / "b" / "checkpoint.pt")
    assert state["stats"]["count"] == {"D": 1, "Dreg": 0, "G": 1}  # one step since the log at step 2
    assert state["stats"]["sum"][rec.LOSS_D] > 0 and state["stats"]["sum"][rec.LOSS_G] > 0
    assert [n for n, _ in state["metrics"][rec.train_key("fid", 16)]] == [16]
    second = build(cfg, tracker=killed_log, run_dir=tmp_path / "b")
    assert second.try_resume() and second.step == 3
    got = second.run()
    for net in ("G", "D"):
        for (k, a), b in zip(getattr(straight, net).state_dict().items(), getattr(second, net).state_dict().values()):
            assert torch.equal(a, b), (net, k)
    # every log point once, in order, with the same values (exact on a CPU)
    assert [step for step, _ in killed_log.logged] == [step for step, _ in straight_log.logged]
    assert without_timing(killed_log.logged) == without_timing(straight_log.logged)
    assert second.metric_log.keys() == straight.metric_log.keys()
    for key in straight.metric_log.keys():
        if key != rec.IMG_PER_S:
            assert second.metric_log.series(key) == straight.metric_log.series(key), key
    assert (got.status, got.final, got.best, got.step, got.nimg) == (want.status, want.final, want.best, 6, 48)


def test_each_part_of_the_trainer_restores_its_state_from_a_weights_only_file(tiny_cfg, tmp_path):
    """StepStats, SaturationWatch and MetricLog through checkpoint.write/read: each copy goes on as its original."""
    def roundtrip(state: dict) -> dict:
        return checkpoint.read(checkpoint.write(state, tmp_path / "part.pt"))

    cpu = torch.device("cpu")
    stats = StepStats(cpu)
    for loss_d in (1.0, 2.0):
        stats.add("D", {rec.LOSS_D: torch.tensor(loss_d), rec.D_REAL: torch.tensor(0.75),
                        rec.D_FAKE: torch.tensor(0.25)})
    stats.add("G", {rec.LOSS_G: torch.tensor(3.0)})
    copy = StepStats(cpu)
    copy.load_state_dict(roundtrip(stats.state_dict()))
    want = {rec.LOSS_D: 1.5, rec.D_REAL: 0.75, rec.D_FAKE: 0.25, rec.LOSS_G: 3.0}  # no Dreg update: no loss/r1
    assert copy.reduce() == stats.reduce() == want
    assert copy.reduce() == stats.reduce() == {}  # reduced means start over

    stuck, healthy = {rec.LOSS_D: 0.0, rec.LOSS_G: 1e6}, {rec.LOSS_D: 10.0, rec.LOSS_G: 0.0}
    watch = SaturationWatch(0.0, tiny_cfg(eval__saturation_logs=2).eval)
    for nimg, stats_at in ((8, stuck), (16, stuck), (24, healthy), (32, stuck)):  # an episode, then a new streak
        watch.observe(dict(stats_at), nimg)
    twin = SaturationWatch(0.0, tiny_cfg(eval__saturation_logs=2).eval)
    twin.load_state_dict(roundtrip(watch.state_dict()))
    for w in (watch, twin):
        w.observe(dict(stuck), 40)  # the streak since 32 reaches 2 logs: a second episode, in both
    assert twin.episodes == watch.episodes == [[8, 16], [32, 40]]
    assert twin.saturated_to(40) == watch.saturated_to(40) == 32 and watch.saturated_to(48) is None

    log = MetricLog()
    log.add(8, {rec.LOSS_D: 1.0, rec.train_key("fid", 16): 50.0})
    log.add(16, {rec.LOSS_D: 0.5, rec.train_key("fid", 16): float("nan")})
    same = MetricLog()
    same.load_state_dict(roundtrip(log.state_dict()))
    assert same.keys() == log.keys() == [rec.LOSS_D, "fid/fid16"]
    assert same.series(rec.LOSS_D) == log.series(rec.LOSS_D) == [(8, 1.0), (16, 0.5)]
    assert same.lowest("fid/fid16") == 50.0 and same.lowest(rec.LOSS_G) is None
    with pytest.raises(KeyError, match="'loss/g' was never logged"):  # a missing key is said, not filled in
        same.series(rec.LOSS_G)


def test_best_values_come_from_the_log_on_the_training_sample_count(tiny_cfg):
    """The lowest finite value on eval.fid_samples; only without one, on eval.fid_final_samples."""
    cfg = tiny_cfg(eval__fid_every_kimg=0.016, eval__fid_samples=16, eval__fid_final_samples=24)
    trainer = build(cfg, with_fid=False)
    # the final 24-sample values are the lowest, but biased differently: they never compete with the 16-sample ones
    trainer.metric_log.add(16, {"fid/fid16": 50.0, "kid/kid16": 0.5})
    trainer.metric_log.add(24, {"fid/fid16": 55.0, "kid/kid16": 0.4})
    trainer.metric_log.add(32, {"fid/fid24": 40.0, "kid/kid24": 0.3, "fid/final": 40.0, "kid/final": 0.3})
    trainer.metric_log.add(40, {"kid/kid16": float("nan")})
    assert trainer.best_values() == {"fid": 50.0, "kid": 0.4}
    only_final = build(cfg, with_fid=False)  # no finite training evaluation: the final count is the only one
    only_final.metric_log.add(16, {"fid/fid16": float("nan")})
    only_final.metric_log.add(32, {"fid/fid24": 40.0})
    assert only_final.best_values() == {"fid": 40.0}


def test_an_old_or_unreadable_checkpoint_is_a_one_line_user_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    first = build(cfg, with_fid=False, run_dir=tmp_path)
    first.train_step()
    path = first.save_checkpoint()
    state = torch.load(path, weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("format", "stats", "saturation", "metrics")}
    old.update(fid_history=[], history={}, evals=[], saturated_logs=0,  # the layout before the trainer's parts
               saturation={"episodes": [], "since": None}, stats={"acc": {}, "count": {}})
    torch.save(old, path)
    with pytest.raises(UserError, match="older version of the trainer; delete it to start over") as refused:
        build(cfg, with_fid=False, run_dir=tmp_path).try_resume()
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read .*delete it to start over"):
        build(cfg, with_fid=False, run_dir=tmp_path).try_resume()


def test_resume_hands_only_cpu_byte_tensors_to_set_state(tiny_cfg, tmp_path, monkeypatch):
    """What a GPU resume does, on the CPU: a loader that mapped the checkpoint to the device would hand
    set_state device tensors (here 'meta' ones stand for CUDA), which it refuses."""
    cfg = tiny_cfg()
    first = build(cfg, with_fid=False, run_dir=tmp_path)
    first.train_step()
    path = first.save_checkpoint()
    state = torch.load(path, weights_only=True)
    state["cuda_rng"] = [torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()]
    torch.save(state, path)  # as if saved on a GPU: one CUDA RNG state

    real_load = torch.load

    def load_like_a_device(f, map_location=None, **kwargs):
        loaded = real_load(f, map_location=map_location, **kwargs)
        if str(map_location) != "cpu":  # map_location=<device> puts every tensor there
            loaded = torch.utils._pytree.tree_map(lambda t: t.to("meta") if torch.is_tensor(t) else t, loaded)
        return loaded

    handed = []

    class Recorder:
        def set_state(self, s):
            handed.append(s)

    monkeypatch.setattr(torch, "load", load_like_a_device)
    monkeypatch.setattr(torch, "set_rng_state", handed.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", handed.extend)
    second = build(cfg, with_fid=False, run_dir=tmp_path)
    second.zgen, second.batches.gen, second.augment_gen = Recorder(), Recorder(), Recorder()
    assert second.try_resume() and second.step == 1
    assert len(handed) == 5  # z, batches, augmentation, torch, one CUDA device
    assert all(s.device.type == "cpu" and s.dtype == torch.uint8 for s in handed)
    for a, b in zip(first.G.state_dict().values(), second.G.state_dict().values()):
        assert torch.equal(a, b)


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(tiny_cfg, tmp_path, monkeypatch):
    """The process dies halfway through writing the second checkpoint: the first is still there, whole, and the
    run resumes from it to the same weights as a run never interrupted."""
    import core.trainer as trainer_mod
    cfg = tiny_cfg(train__checkpoint_every_kimg=0.008)  # a checkpoint after every step
    straight = build(cfg, with_fid=False)
    straight.run()

    save = torch.save
    saves = []

    def die_halfway(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        saves.append(f)
        if len(saves) == 2:
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])  # the kill hits in the middle of the write
            raise Killed

    monkeypatch.setattr(trainer_mod.torch, "save", die_halfway)
    first = build(cfg, with_fid=False, run_dir=tmp_path)
    with pytest.raises(Killed):
        first.run()
    monkeypatch.setattr(trainer_mod.torch, "save", save)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    second = build(cfg, with_fid=False, run_dir=tmp_path)
    assert second.try_resume() and second.step == 1
    second.run()
    for a, b in zip(straight.G.state_dict().values(), second.G.state_dict().values()):
        assert torch.equal(a, b)
