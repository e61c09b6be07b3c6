import math

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
