import math
from pathlib import Path

import pytest
import torch

from core.build import build_run
from core.errors import UserError
from core.runner import execute_run


def test_a_few_cpu_steps_give_finite_losses_and_count_images(tiny_cfg):
    trainer = build_run(tiny_cfg(), with_fid=False)
    before = [p.detach().clone() for p in trainer.G.parameters()]
    result = trainer.run()
    assert result.status == "finished" and result.step == 4 and result.nimg == 32
    assert trainer.d_steps == 4 and trainer.g_steps == 4
    for key in ("loss/d", "loss/g", "d/real", "d/fake", "perf/img_per_s"):
        assert all(math.isfinite(v) for _, v in trainer.history[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.G.parameters()))


def test_run_is_recorded_in_mlflow(tiny_cfg, store, tmp_path):
    from core.data import load_images
    cfg = tiny_cfg()
    tracker = store.start_run("trainer-test", "one", {"variant": "baseline"})
    images = load_images(cfg.data, cfg.model.resolution)
    result = execute_run(cfg, tracker, tmp_path / "run", images=images)
    tracker.finish()
    run = store.client.get_run(tracker.run_id)
    assert run.data.params["model.resolution"] == "32" and run.data.params["train.batch_size"] == "8"
    assert run.data.params["derived.steps"] == "4" and run.data.params["dataset.images"] == "48"
    assert run.data.tags["outcome"] == "finished"
    assert run.data.tags["fid_protocol.num_gen"] == "16"
    assert run.data.metrics["fid/final"] == pytest.approx(result.final_fid)
    assert [m.step for m in store.client.get_metric_history(tracker.run_id, "loss/d")] == [8, 16, 24, 32]
    artifacts = {a.path for a in store.client.list_artifacts(tracker.run_id)}
    assert {"config.json", "checkpoints", "plots", "samples", "summary.json", "fid_reference"} <= artifacts
    assert store.list_artifacts(tracker.run_id, "samples") == [  # every 0.016 kimg, each its own file
        "samples/fakes000000.016kimg.png", "samples/fakes000000.032kimg.png"]


def test_resumed_run_continues_exactly_where_it_stopped(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    straight = build_run(cfg, with_fid=False, run_dir=tmp_path / "a")
    straight.run()

    first = build_run(cfg, with_fid=False, run_dir=tmp_path / "b")
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    second = build_run(cfg, with_fid=False, run_dir=tmp_path / "b")
    assert second.try_resume() and second.step == 2 and second.nimg == 16
    second.run()
    for a, b in zip(straight.G.state_dict().values(), second.G.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(straight.D.state_dict().values(), second.D.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_from_another_config_is_refused(tiny_cfg, tmp_path):
    first = build_run(tiny_cfg(), with_fid=False, run_dir=tmp_path)
    first.train_step()
    first.save_checkpoint()
    other = build_run(tiny_cfg(optim__lr_d=1e-3), with_fid=False, run_dir=tmp_path)
    with pytest.raises(UserError, match="optim.lr_d"):
        other.try_resume()


def test_non_finite_loss_stops_the_run_as_diverged(tiny_cfg):
    trainer = build_run(tiny_cfg(), with_fid=False)
    with torch.no_grad():
        for p in trainer.D.parameters():
            p.fill_(float("nan"))
    result = trainer.run()
    assert result.status == "diverged" and result.diverged_at == 8 and result.step == 1


class Killed(Exception):
    pass


def test_resume_between_two_log_points_logs_the_same_losses(tiny_cfg, tmp_path):
    """Checkpoint at step 3, logs at steps 2, 4, 6: the mean logged at step 4 spans the kill."""
    cfg = tiny_cfg(train__kimg=0.048, train__log_every_kimg=0.016, train__checkpoint_every_kimg=0.024)
    straight = build_run(cfg, with_fid=False, run_dir=tmp_path / "a")
    straight.run()

    first = build_run(cfg, with_fid=False, run_dir=tmp_path / "b")
    save = first.save_checkpoint

    def save_then_die():
        save()
        raise Killed  # the process dies right after writing the checkpoint

    first.save_checkpoint = save_then_die
    with pytest.raises(Killed):
        first.run()
    assert first.step == 3
    second = build_run(cfg, with_fid=False, run_dir=tmp_path / "b")
    assert second.try_resume() and second.step == 3
    second.run()
    for key in ("loss/d", "loss/g", "d/real", "d/fake"):
        assert second.history[key] == straight.history[key], key  # exact: the sums since step 2 were saved


def test_resume_hands_only_cpu_byte_tensors_to_set_state(tiny_cfg, tmp_path, monkeypatch):
    """What a GPU resume does, on the CPU: a loader that mapped the checkpoint to the device would hand
    set_state device tensors (here 'meta' ones stand for CUDA), which it refuses."""
    cfg = tiny_cfg()
    first = build_run(cfg, with_fid=False, run_dir=tmp_path)
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
    second = build_run(cfg, with_fid=False, run_dir=tmp_path)
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
    straight = build_run(cfg, with_fid=False)
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
    first = build_run(cfg, with_fid=False, run_dir=tmp_path)
    with pytest.raises(Killed):
        first.run()
    monkeypatch.setattr(trainer_mod.torch, "save", save)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 1
    second = build_run(cfg, with_fid=False, run_dir=tmp_path)
    assert second.try_resume() and second.step == 1
    second.run()
    for a, b in zip(straight.G.state_dict().values(), second.G.state_dict().values()):
        assert torch.equal(a, b)
