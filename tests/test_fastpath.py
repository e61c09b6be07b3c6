"""The fastest path, chosen by measurement: the chooser on made-up timings, the measurement on real tiny
trainers, what a run records, resume on its checkpoint's path, and the compiled path against eager."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

import core.fastpath as fastpath
from core import records as rec
from core.build import build_run, path_builder, run_path
from core.device import ExecPath, candidate_paths
from core.errors import UserError
from core.fastpath import PathChoice, Timing, choose_path, fastest, time_paths
from core.runner import execute_run
from core.tracking import NullTracker
from tests.conftest import step_losses
from tests.helpers import _decoded, images_for

AUTO = {"train__amp": "auto", "train__channels_last": "auto", "train__compile": "auto"}


@pytest.fixture(autouse=True)
def _fresh_process_memory(monkeypatch):
    """Each test as a new process: no measurement kept in memory from another test (tests/ run in parallel, and
    a measurement beside them counts as one under load)."""
    monkeypatch.setattr(fastpath, "_UNTRUSTED", {})
CPU = torch.device("cpu")
BF16_NHWC, FP32_NCHW = ExecPath("bf16", True), ExecPath("fp32", False)


def test_candidates_are_every_path_the_explicit_settings_leave_open(tiny_cfg):
    assert len(candidate_paths(tiny_cfg(**AUTO).train)) == 8
    assert len(candidate_paths(tiny_cfg(**AUTO).train, can_compile=False)) == 4  # no C++ compiler: eager only
    pinned = candidate_paths(tiny_cfg(**{**AUTO, "train__amp": "bf16"}).train)
    assert len(pinned) == 4 and {p.amp for p in pinned} == {"bf16"}
    assert candidate_paths(tiny_cfg(train__amp="bf16", train__channels_last="on", train__compile="on").train) == [
        ExecPath("bf16", True, True)]
    for path in candidate_paths(tiny_cfg(**AUTO).train):
        assert ExecPath.parse(path.name) == path


def _fake(img_per_s: dict[str, float | None], errors: dict[str, str] | None = None):
    """time_paths' stand-in: made-up img/s per path name (None: that path failed), recording what it was asked."""
    asked = []

    def time_paths(paths, build, device, **kw):
        asked.append(sorted(p.name for p in paths))
        return {p: Timing(p, img_per_s.get(p.name), 1.0, 0.0, (errors or {}).get(p.name, "")
                          or ("" if img_per_s.get(p.name) else "RuntimeError: boom")) for p in paths}
    return time_paths, asked


def test_the_chooser_keeps_the_fastest_usable_path_caches_it_and_honours_explicit_settings(tiny_cfg, tmp_path,
                                                                                          monkeypatch):
    speeds = {"bf16+NHWC+eager": 300.0, "bf16+NCHW+eager": 250.0, "fp32+NHWC+eager": 120.0, "fp32+NCHW+eager": 100.0,
              "bf16+NHWC+compiled": None, "bf16+NCHW+compiled": 900.0, "fp32+NHWC+compiled": 280.0,
              "fp32+NCHW+compiled": 150.0}
    fake, asked = _fake(speeds, errors={"bf16+NCHW+compiled": "first losses differ from fp32 eager by 9.0e-02"})
    monkeypatch.setattr(fastpath, "time_paths", fake)
    monkeypatch.setattr(fastpath, "can_compile", lambda device: True)
    cfg = tiny_cfg(**AUTO, data__cache_dir=str(tmp_path))
    choice = choose_path(cfg, CPU, build=lambda path: pytest.fail("time_paths builds, not the chooser"))
    # the fastest (900) is rejected by its losses and one compiled path failed: the fastest usable one wins
    assert choice.path == BF16_NHWC and choice.source == "measured" and len(asked) == 1 and len(asked[0]) == 8
    tag = choice.tags()[rec.PATH_CANDIDATES]
    assert tag.startswith("bf16+NHWC+eager 300 img/s; fp32+NHWC+compiled 280 img/s, compiles 0 s a run (1 s cold)")
    assert "bf16+NCHW+compiled rejected: first losses differ" in tag and "bf16+NHWC+compiled rejected: Runtime" in tag
    assert choice.params() == {"derived.amp": "bf16", "derived.channels_last": True, "derived.compile": False,
                               "derived.path_source": "measured"}
    # measured once: the same model and batch later come from the cache, also in another process (the file)
    again = choose_path(cfg, CPU, build=lambda path: pytest.fail("measured twice"))
    assert (again.path, again.source, len(asked)) == (BF16_NHWC, "cached", 1)
    saved = json.loads((tmp_path / fastpath.CACHE_FILE).read_text())["entries"]
    (entry,) = saved.values()
    assert entry["description"]["batch"] == 8 and entry["description"]["device"] and len(entry["timings"]) == 8
    # explicit settings narrow the choice, from the same measurements
    fp32 = choose_path(tiny_cfg(**{**AUTO, "train__amp": "fp32"}, data__cache_dir=str(tmp_path)), CPU, build=None)
    assert (fp32.path, fp32.source, len(asked)) == (ExecPath("fp32", True, True), "cached", 1)
    eager = choose_path(tiny_cfg(**{**AUTO, "train__compile": "off"}, data__cache_dir=str(tmp_path)), CPU, build=None)
    assert eager.path == BF16_NHWC
    pinned = choose_path(tiny_cfg(data__cache_dir=str(tmp_path)), CPU, build=lambda p: pytest.fail("measured"))
    assert (pinned.path, pinned.source) == (FP32_NCHW, "explicit")
    # another batch is another measurement; without a builder nothing is measured (shared images' layout)
    other = tiny_cfg(**AUTO, data__cache_dir=str(tmp_path), train__batch_size=16)
    assert choose_path(other, CPU, build=None).source == "unmeasured" and len(asked) == 1
    assert choose_path(other, CPU, build=lambda p: None).source == "measured" and len(asked) == 2
    assert fastest([Timing(BF16_NHWC, error="boom")], [BF16_NHWC, FP32_NCHW]) == BF16_NHWC  # none usable: eager


def test_a_compiled_path_wins_only_where_the_run_is_long_enough_to_earn_its_compile_back():
    compiled = Timing(ExecPath("bf16", True, True), 260.0, first_step_s=50.0, setup_s=20.0)
    eager = Timing(BF16_NHWC, 245.0)
    both = [compiled.path, eager.path]
    assert fastest([compiled, eager], both) == compiled.path  # by img/s alone
    # 60 kimg: 20 + 230.8 s compiled against 244.9 s eager; 30 kimg: 20 + 115.4 against 122.4
    assert fastest([compiled, eager], both, images=60_000) == eager.path
    assert fastest([compiled, eager], both, images=30_000) == eager.path
    assert fastest([compiled, eager], both, images=2_000_000) == compiled.path


def test_time_paths_measures_real_trainers_and_rejects_other_losses_and_failures(tiny_cfg, monkeypatch):
    # bf16 is timed in full however slow: on a CPU without AVX512_BF16 its tiny steps are 3-6x fp32's, around
    # SLOW_FACTOR (the next test checks that rule on made-up step times)
    monkeypatch.setattr(fastpath, "SLOW_FACTOR", math.inf)
    cfg = tiny_cfg(**AUTO)
    images = _decoded(cfg.data, cfg.model.resolution)
    builder = path_builder(cfg, images, CPU)
    other_losses = path_builder(tiny_cfg(**AUTO, train__real_label=0.5), images, CPU)  # D's targets differ

    def build(path):
        if path == ExecPath("fp32", True):
            return other_losses(path)
        if path == ExecPath("bf16", False):
            raise RuntimeError("boom\nwith a long traceback")
        return builder(path)
    timings = time_paths([BF16_NHWC, ExecPath("bf16", False), ExecPath("fp32", True), FP32_NCHW], build, CPU,
                         rounds=1, round_s=0.02)
    assert timings[FP32_NCHW].usable and timings[FP32_NCHW].loss_diff == 0  # the reference itself
    assert timings[BF16_NHWC].usable and 0 < timings[BF16_NHWC].loss_diff <= fastpath.LOSS_RTOL
    assert timings[BF16_NHWC].img_per_s > 0 and timings[BF16_NHWC].first_step_s > 0
    assert timings[ExecPath("bf16", False)].error == "RuntimeError: boom"  # one line
    assert not timings[ExecPath("fp32", True)].usable and "first losses differ" in timings[ExecPath("fp32", True)].error


class _SleepTrainer:
    """A trainer stand-in whose steps take made-up seconds, one per step, the last one repeated."""
    batch = 8

    def __init__(self, seconds: tuple[float, ...]):
        self.seconds, self.steps = seconds, 0

    def train_step(self):
        time.sleep(self.seconds[min(self.steps, len(self.seconds) - 1)])
        self.steps += 1

    def read_stats(self):
        return {rec.LOSS_D: 1.0, rec.LOSS_G: 1.0}

    def close(self):
        pass


def test_a_path_far_slower_than_the_fastest_is_dropped_after_one_steady_step_and_its_compiled_twin_never_built():
    fp32_nhwc, bf16_nchw = ExecPath("fp32", True), ExecPath("bf16", False)
    fp32_compiled, bf16_compiled = ExecPath("fp32", False, True), ExecPath("bf16", False, True)
    seconds = {FP32_NCHW: (0.01,), fp32_nhwc: (0.02,),  # 2x slower: within SLOW_FACTOR, timed in full
               bf16_nchw: (0.2,),  # 20x slower: out of the race
               fp32_compiled: (0.1, 0.3, 0.01)}  # its second step still compiles (30x): judged on its third
    built = []

    def build(path):
        built.append(path)
        return _SleepTrainer(seconds[path])
    timings = time_paths([bf16_compiled, fp32_compiled, bf16_nchw, fp32_nhwc], build, CPU, rounds=1, round_s=0.01)
    assert bf16_compiled not in built and built.count(bf16_nchw) == 1
    assert timings[bf16_nchw].error.startswith(fastpath.SLOW) and "not timed further" in timings[bf16_nchw].error
    assert timings[bf16_compiled].error == f"not compiled: bf16+NCHW+eager was {timings[bf16_nchw].error}"
    assert timings[fp32_nhwc].usable and timings[fp32_compiled].usable and timings[FP32_NCHW].usable
    assert timings[fp32_nhwc].img_per_s < timings[FP32_NCHW].img_per_s
    assert fastest(list(timings.values()), list(timings)) in (FP32_NCHW, fp32_compiled)


class Recorder(NullTracker):
    def __init__(self):
        self.params, self.tags = {}, {}

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)


def test_a_run_on_auto_measures_once_and_records_its_path_and_every_candidate(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "can_compile", lambda device: False)  # eager paths: compiling is tested below
    monkeypatch.setattr(fastpath, "ROUND_S", 0.02)
    cfg = tiny_cfg(**AUTO, data__cache_dir=str(tmp_path / "cache"))
    images = images_for(cfg)
    tracker = Recorder()
    result = execute_run(cfg, tracker, tmp_path / "run", images=images, with_fid=False)
    assert result.status == rec.Outcome.FINISHED
    chosen = ExecPath(tracker.params["derived.amp"], tracker.params["derived.channels_last"],
                      tracker.params["derived.compile"])
    assert tracker.params["derived.path_source"] == "measured" and tracker.params["train.amp"] == "auto"
    shown = tracker.tags[rec.PATH_CANDIDATES].split("; ")
    assert len(shown) == 4 and shown[0].startswith(chosen.name)  # the chosen one is the fastest shown
    second = Recorder()
    execute_run(cfg, second, tmp_path / "run2", images=images, with_fid=False)
    assert second.params["derived.path_source"] == "cached" and second.params["derived.amp"] == chosen.amp


def test_a_resumed_run_stays_on_its_checkpoints_path_bit_identically(tiny_cfg, tmp_path, monkeypatch):
    """The cache may say another path is fastest by the time a run resumes: it continues on its own."""
    cfg = tiny_cfg(**AUTO, data__cache_dir=str(tmp_path / "cache"))
    images = images_for(cfg)
    on_bf16 = PathChoice(BF16_NHWC, "measured")
    whole = build_run(cfg, images=images, with_fid=False, path=on_bf16, run_dir=tmp_path / "whole")
    whole.run()
    first = build_run(cfg, images=images, with_fid=False, path=on_bf16, run_dir=tmp_path / "cut")
    for _ in range(2):
        first.train_step()
    first.save_checkpoint()
    first.close()
    fake, _ = _fake({"fp32+NCHW+eager": 1000.0, "bf16+NHWC+eager": 1.0, "bf16+NCHW+eager": 1.0,
                     "fp32+NHWC+eager": 1.0})
    monkeypatch.setattr(fastpath, "time_paths", fake)
    monkeypatch.setattr(fastpath, "can_compile", lambda device: False)
    assert run_path(cfg, images.image_set, run_dir=tmp_path / "fresh").path == FP32_NCHW  # what a new run takes
    second = build_run(cfg, images=images, with_fid=False, run_dir=tmp_path / "cut")
    assert second.path_choice == PathChoice(BF16_NHWC, "resumed") and second.try_resume()
    second.run()
    for a, b in zip(whole.G.state_dict().values(), second.G.state_dict().values()):
        assert torch.equal(a, b)
    elsewhere = build_run(cfg, images=images, with_fid=False, path=PathChoice(FP32_NCHW, "measured"),
                          run_dir=tmp_path / "cut")
    with pytest.raises(UserError, match="was trained on path bf16\\+NHWC\\+eager, this run is built on fp32"):
        elsewhere.try_resume()


def test_the_compiled_path_trains_like_eager_and_resumes_bit_identically(tiny_cfg, tmp_path):
    """torch.compile on the CPU (inductor's C++), end to end on a tiny model: its losses are eager's to
    within float rounding, and a checkpointed run continues exactly."""
    cfg = tiny_cfg(train__compile="on", data__cache_dir=str(tmp_path / "cache"))
    eager = step_losses(build_run(cfg, images=images_for(cfg), with_fid=False,
                                  path=PathChoice(FP32_NCHW, "explicit")), 4)
    whole = build_run(cfg, images=images_for(cfg), with_fid=False, run_dir=tmp_path / "whole")
    assert whole.path == ExecPath("fp32", False, True) and whole.G_train is not whole.G
    np.testing.assert_allclose(step_losses(whole, 4), eager, rtol=1e-4)
    assert (tmp_path / "cache" / "inductor").is_dir()  # inductor's kernels under the suite's cache folder
    cut = build_run(cfg, images=images_for(cfg), with_fid=False, run_dir=tmp_path / "cut")
    step_losses(cut, 2)
    cut.save_checkpoint()  # not closed: close() resets dynamo, and the next build would compile again (seconds)
    resumed = build_run(cfg, images=images_for(cfg), with_fid=False, run_dir=tmp_path / "cut")
    assert resumed.path_choice.source == "resumed" and resumed.try_resume()
    step_losses(resumed, 2)
    for a, b in zip(whole.G.state_dict().values(), resumed.G.state_dict().values()):
        assert torch.equal(a, b)


def test_a_graph_that_fails_to_compile_runs_eagerly_instead_of_failing_the_run(tiny_cfg, monkeypatch, capfd):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler today")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real_compile(module, backend=broken_backend))
    cfg = tiny_cfg(train__compile="on")
    trainer = build_run(cfg, images=images_for(cfg), with_fid=False)
    assert trainer.path.compile
    try:
        losses = step_losses(trainer, 2)
    finally:
        trainer.close()
    eager = step_losses(build_run(cfg, images=images_for(cfg), with_fid=False, path=PathChoice(FP32_NCHW, "explicit")), 2)
    assert losses == eager  # the same steps, run eagerly
    err = capfd.readouterr().err
    said = [line for line in err.splitlines() if "could not compile" in line]
    assert said and all("RuntimeError: no C++ compiler today" in line and "runs eagerly" in line for line in said)
    assert "Traceback" not in err and len(err.splitlines()) == len(said)  # one line each, nothing else


def test_other_processes_busy_on_the_cpu_are_measured(tmp_path):
    import subprocess
    import sys
    import time
    with fastpath.OtherLoad() as short:
        time.sleep(0.2)
    assert math.isnan(short.share)  # too short a stretch to say
    spin = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        with fastpath.OtherLoad() as busy:
            time.sleep(1.0)
    finally:
        spin.wait()
    cores = __import__("os").cpu_count()
    assert busy.share > 0.6 / cores  # one spinning process alone is 1/cores of the machine


def test_a_measurement_under_load_is_used_but_not_cached(tiny_cfg, tmp_path, monkeypatch):
    class Busy:
        share = 0.9

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass
    fake, asked = _fake({"fp32+NCHW+eager": 100.0, "bf16+NHWC+eager": 300.0, "bf16+NCHW+eager": 1.0,
                         "fp32+NHWC+eager": 1.0})
    monkeypatch.setattr(fastpath, "time_paths", fake)
    monkeypatch.setattr(fastpath, "can_compile", lambda device: False)
    monkeypatch.setattr(fastpath, "OtherLoad", Busy)
    cfg = tiny_cfg(**AUTO, data__cache_dir=str(tmp_path))
    said = []
    assert choose_path(cfg, CPU, build=lambda p: None, progress=said.append).path == BF16_NHWC
    assert not (tmp_path / fastpath.CACHE_FILE).exists() and "not cached" in said[-1]
    assert choose_path(cfg, CPU, build=lambda p: None).path == BF16_NHWC and len(asked) == 1  # this process: kept
    fastpath._UNTRUSTED.clear()  # the next process
    choose_path(cfg, CPU, build=lambda p: None)
    assert len(asked) == 2
