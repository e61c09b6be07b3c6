"""Reports: numbers recomputed from mlflow.search_runs (Welch + Holm by scipy), failures counted as results and
never starred, every linked image present, no absolute path of this machine, and the MLflow UI checked through
REST and a real browser.

One small study (3 variants x 2 seeds, one variant diverging on purpose) is run once for the module.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ablations.registry import _REGISTRY, Ablation, register_ablation
from core.records import Outcome
from core.tracking import Store
from studies.report import stats
from studies.report.__main__ import main as report_main
from studies.report.build import write_report
from studies.report.evidence import verdict_from_csv
from studies.run.study import StudySpec, run_study
from tests.conftest import draw_pictures
from tests.helpers import git_head, install_fake_fid, md_table, mlflow_search_runs
from tests.helpers import mlflow_server as start_mlflow_server

NAME = "reportcheck"
FAST = {  # 32x32, 8 steps of batch 8; FID/KID (tests.helpers.install_fake_fid: a function of G's weights) on 16
    # samples at 32 images and on 8 at the end (64 images), so a run's best values (fid/best, kid/best: its training
    # evaluation) differ from its final ones (fid/final, kid/final): a report that reads the wrong metric shows
    # other numbers.
    "train.device": "cpu", "train.batch_size": 8, "optim.lr_ref_batch": 8, "train.kimg": 0.064,
    "train.log_every_kimg": 0.016, "train.sample_every_kimg": 0.032, "train.checkpoint_every_kimg": 1.0,
    "eval.fid_every_kimg": 0.032, "eval.fid_samples": 16, "eval.fid_final_samples": 8, "eval.fid_ref_images": 32,
    "eval.fid_batch": 16, "eval.grid_size": 4, "data.max_images": 48,
}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


class ReportCheck(Ablation):
    """Test-only: D downsampling by max pooling (a real change) and an absurd D learning rate that must diverge."""
    name = NAME
    summary = "report test: maxpool vs a diverging D learning rate"
    variants = {"baseline": {}, "maxpool": {"model.d_downsample": "maxpool"}, "hot": {"optim.lr_d": 1e30}}


@pytest.fixture(scope="module")
def study(tmp_path_factory, synthetic_root, cache_dir, _migrated_mlflow_db, _blank_pictures):
    """Run the study once; yields (store, report path, tmp dir), the report with its real pictures. The test
    ablation is unregistered afterwards."""
    register_ablation(ReportCheck)
    tmp = tmp_path_factory.mktemp("report-study")
    store = Store(f"sqlite:///{shutil.copy(_migrated_mlflow_db, tmp / 'mlflow.db')}")  # schema made once per session
    try:
        spec = StudySpec(NAME, seeds=(0, 1), preset="quick", workdir=tmp / "runs",
                         overrides={**FAST, "data.root": str(synthetic_root), "data.cache_dir": str(cache_dir)})
        from core.build import share_images
        from core.data import load_images
        from studies.run.study import resolve_configs
        first = next(iter(resolve_configs(spec).values()))
        with pytest.MonkeyPatch.context() as mp:  # FID as a function of G's weights: the report's numbers are what
            install_fake_fid(mp)  # is checked here; tests/test_study_cli.py scores a study with Inception (30 s here)
            run_study(spec, store, share_images(first, load_images(first.data, first.model.resolution)), progress=False)
        with pytest.MonkeyPatch.context() as mp:
            draw_pictures(mp, _blank_pictures)
            path = write_report(store, NAME, tmp / "reports")
        yield store, path, tmp
    finally:
        _REGISTRY.pop(NAME, None)


def search_runs(store: Store) -> tuple[pd.Series, pd.DataFrame]:
    """The study's parent and children straight from mlflow.search_runs, independent of the report code."""
    runs = mlflow_search_runs(store.uri, NAME)
    parent = runs[runs["tags.study"] == "parent"].iloc[0]
    return parent, runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The markdown table under `heading`, as first cell (markup stripped) -> cells."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("|") and not set(line) <= set("|:- "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[re.sub(r"[*★]|best", "", cells[0]).strip()] = cells
    return rows


RESULTS = "Results per variant"
OUTCOMES = ("finished", "diverged", "collapsed", "d_saturated", "failed")


def _holm(p: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni by hand: the k-th smallest of m p-values times (m - k + 1), kept monotone, capped at 1."""
    order = sorted(p, key=p.get)
    out, running = {}, 0.0
    for k, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p[name]))
        out[name] = running
    return out


def _recompute_and_compare(uri: str, experiment: str, text: str) -> dict[str, float]:
    """Every number of the variant table, recomputed from mlflow.search_runs with scipy and a hand-written Holm;
    returns the Holm p of each tested variant."""
    from scipy import stats as sps
    runs = mlflow_search_runs(uri, experiment)
    children = runs[runs["tags.study"] == "child"]
    assert (children["params.derived.primary_metric"] == "kid").all()  # few final samples: KID decides
    rows = {v: cells for v, cells in table_rows(text, RESULTS).items() if v != "variant"}
    assert set(rows) == set(children["tags.variant"])
    ok = children["tags.outcome"].isin(["finished", "stopped"]) & children["metrics.kid/final"].notna()
    kid = {v: children[ok & (children["tags.variant"] == v)]["metrics.kid/final"].to_numpy() for v in rows}
    fid = {v: children[ok & (children["tags.variant"] == v)]["metrics.fid/final"].to_numpy() for v in rows}
    tested = [v for v in rows if v != "baseline" and len(kid[v]) > 1]
    welch = {v: sps.ttest_ind(kid[v], kid["baseline"], equal_var=False) for v in tested}
    holm = _holm({v: welch[v].pvalue for v in tested})
    for variant, cells in rows.items():
        mine = children[children["tags.variant"] == variant]
        counts = [int((mine["tags.outcome"] == o).sum()) for o in OUTCOMES]
        assert cells[1] == str(sum(counts)) and cells[2] == " / ".join(map(str, counts))
        assert cells[14] == f"{mine['metrics.perf/img_per_s'].mean():.0f}"
        if len(kid[variant]) > 1:
            assert cells[5] == f"{kid[variant].mean():.4g} ± {kid[variant].std(ddof=1):.2g}"
            assert cells[6] == f"{fid[variant].mean():.4g} ± {fid[variant].std(ddof=1):.2g}"
            for cell, key in zip(cells[11:14], ("pr/final_precision", "pr/final_recall", "dc/final_coverage")):
                side = children[ok & (children["tags.variant"] == variant)][f"metrics.{key}"].to_numpy()
                assert cell == f"{side.mean():.4g} ± {side.std(ddof=1):.2g}", (variant, key)
        if variant in tested:
            ci = welch[variant].confidence_interval(0.95)
            diff = kid[variant].mean() - kid["baseline"].mean()
            assert cells[7] == f"{diff:+.3g} [{ci.low:+.3g}, {ci.high:+.3g}]"
            assert cells[8] == f"{holm[variant]:.3g}"
            assert cells[9].startswith("**yes**" if holm[variant] < 0.05 and diff < 0 else
                                       "yes" if holm[variant] < 0.05 else "no"), (variant, cells[9])
        elif variant != "baseline":
            assert cells[9] == "too few seeds" and cells[8] == "–"
    return holm


def test_significance_column_equals_welch_holm_from_search_runs(study):
    store, path, _ = study
    holm = _recompute_and_compare(store.uri, NAME, path.read_text())
    assert list(holm) == ["maxpool"]  # hot diverged on both seeds: no metric to test
    assert "`maxpool`: 2 of 2 seeds finished" in path.read_text().split("## Verdict\n", 1)[1].split("\n## ", 1)[0]


def test_holm_decides_the_significance_column(store, tmp_path):
    # `edge` alone would be significant (Welch p 0.036) but not after Holm over three variants (0.072)
    _fake_study(store, "holm-study", {
        "baseline": [("finished", x) for x in (0.30, 0.31, 0.29)],
        "strong": [("finished", x) for x in (0.25, 0.26, 0.24)],
        "edge": [("finished", x) for x in (0.285, 0.275, 0.27)],
        "null": [("finished", x) for x in (0.31, 0.33, 0.30)]})
    text = write_report(store, "holm-study", tmp_path / "reports").read_text()
    holm = _recompute_and_compare(store.uri, "holm-study", text)
    assert holm["strong"] < 0.05 < holm["edge"] < 2 * 0.036
    assert table_rows(text, RESULTS)["edge"][9] == "no" and "★" in table_rows(text, RESULTS)["strong"][0]


def _fake_study(store, name: str, seeds: dict[str, list[tuple[str, float]]]) -> None:
    """A study's runs written straight into a store, as the trainer would leave them: (outcome, final KID) per seed."""
    parent = store.start_run(name, f"{name} study", {"study": "parent", "ablation": name, "preset": "quick",
                                                    "base": "none", "variants": ",".join(seeds),
                                                    "seeds": ",".join(map(str, range(3)))})
    for variant, runs in seeds.items():
        for seed, (outcome, kid) in enumerate(runs):
            child = store.start_run(name, f"{variant}-s{seed}", {"study": "child", "ablation": name, "variant": variant,
                                                                 "seed": seed, "preset": "quick"}, parent=parent)
            child.log_params({"derived.primary_metric": "kid", "eval.fid_samples": 128, "eval.fid_final_samples": 256,
                              "model.resolution": 32, "train.seed": seed})
            child.log_metrics({"progress/kimg": 12.0 if outcome == "finished" else 5.0, "perf/img_per_s": 100.0,
                               "loss/d": 1.2, "loss/g": 0.9, "d/real": 0.6, "d/fake": 0.4}, step=12000)
            if outcome == "finished":
                child.log_metrics({"kid/final": kid, "kid/final_std": kid / 20, "fid/final": 1000 * kid,
                                   "pr/final_precision": 1 - kid, "pr/final_recall": 0.8 - kid - seed / 100,
                                   "dc/final_density": 1.1 - kid, "dc/final_coverage": 0.9 - kid - seed / 50},
                                  step=12000)
            child.set_tags({"outcome": outcome, **({"diverged_at_nimg": 5000} if outcome == "diverged" else {})})
            child.finish()
    parent.finish()


def test_a_variant_diverging_in_2_of_3_seeds_carries_its_failures_and_is_not_starred(store, tmp_path):
    # `fragile` has by far the lowest KID on the one seed that finished: a mean over lucky seeds would crown it
    _fake_study(store, "fragile-study", {
        "baseline": [("finished", 0.30), ("finished", 0.31), ("finished", 0.29)],
        "fragile": [("diverged", 0.0), ("finished", 0.05), ("diverged", 0.0)],
        "steady": [("finished", 0.20), ("finished", 0.21), ("finished", 0.19)]})
    text = write_report(store, "fragile-study", tmp_path / "reports").read_text()
    rows = table_rows(text, RESULTS)
    fragile = rows["fragile"]
    assert fragile[1] == "3" and fragile[2] == "1 / 2 / 0 / 0 / 0"  # failed seeds are in n
    assert fragile[3] == "0.67 [0.09, 0.99]" and fragile[4] == "0.4"  # Clopper-Pearson; Fisher vs 0 of 3
    assert fragile[5] == "0.05 (1 seed)" and fragile[9] == "too few seeds" and "★" not in fragile[0]
    assert "★" in rows["steady"][0] and rows["steady"][9] == "**yes**: better"
    verdict = text.split("## Verdict\n", 1)[1].split("\n## ", 1)[0]
    assert verdict.index("**Failures**: `fragile` failed in 2 of 3 seeds (diverged 2), rate 0.67 (95% CI 0.09-0.99)") \
        < verdict.index("**Final KID**: `steady` is better than the baseline")
    assert "`fragile`: diverged in 2 of 3 seeds (rate 0.67, 95% CI 0.09-0.99)" in verdict
    assert "_no sample grid logged_" in text and "/tmp/" not in text


def _runs(values: dict[str, list[float]], outcome: str = "finished") -> pd.DataFrame:
    rows = [{"variant": v, "seed": i, "run": f"{v}-s{i}", "outcome": outcome, "final_kid": x, "final_fid": 100 * x,
             "kid_std": 0.01, "best_kid": x, "best_fid": 100 * x, "kimg": 1.0, "img_per_s": 100.0,
             "final_precision": 1 - x, "final_recall": 0.5, "final_density": 1.0, "final_coverage": 0.5,
             "diverged_at_kimg": math.nan, "saturation": "", "run_id": f"{v}{i}"}
            for v, xs in values.items() for i, x in enumerate(xs)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("values,says", [
    ({"baseline": [0.50], "trick": [0.40]}, "KID not tested: too few finished seeds"),
    ({"baseline": [0.50, 0.51, 0.52, 0.505], "trick": [0.40, 0.41, 0.395, 0.405]}, "`trick` is better than the baseline"),
    ({"baseline": [0.50, 0.30, 0.45], "trick": [0.44, 0.33, 0.45]}, "a difference smaller than"),
    ({"baseline": [0.40, 0.41, 0.39], "trick": [0.50, 0.52, 0.51]}, "KID significantly worse"),
])
def test_verdict_follows_the_numbers(values, says):
    rows = stats.variant_rows(_runs(values), list(values), "kid")
    text = " ".join(stats.verdict_lines(rows, "kid"))
    assert says in text, text
    assert ("`trick` is better" in text) == {r.name: r for r in rows}["trick"].best


def test_portable_paths():
    from studies.report.sections import portable
    cwd = Path.cwd()
    # a data folder under a root that exists here but holds no part of cwd, wherever the checkout was cloned to
    # (a clone under /tmp shares /tmp with /tmp/x and would rightly get a relative path)
    root = next(r for r in ("/tmp", "/usr", "/var", "/etc") if Path(r).is_dir() and cwd.resolve().parts[1] != r[1:])
    text = (f"sqlite:///{cwd}/.cache-quick/mlflow.db --data folder:{root}/x/celeba-subset/img_align_celeba "
            "http://127.0.0.1:5000/#/experiments/1/runs?a=b kid/kid10k img/s /nonexistent-root/a/b")
    assert portable(text, cwd) == ("sqlite:///.cache-quick/mlflow.db --data folder:…/celeba-subset/img_align_celeba "
                                   "http://127.0.0.1:5000/#/experiments/1/runs?a=b kid/kid10k img/s /nonexistent-root/a/b")


def test_markdown_links_only_images_that_exist(study):
    _, path, _ = study
    text = path.read_text()
    links = LINK.findall(text)
    expected = {f"{NAME}/{n}" for n in ("metrics.png", "losses.png", "d_outputs.png", "timelapse.gif",
                                         "samples-baseline.png", "samples-maxpool.png")}
    assert expected <= set(links), set(links)
    # the diverged variant stopped before its first grid: said so, not linked to a missing file
    samples = text.split("## Samples\n", 1)[1].split("\n## ", 1)[0]
    assert "_no sample grid logged_" in samples and f"{NAME}/samples-hot.png" not in links
    for link in links:
        file = path.parent / link
        assert file.is_file() and file.stat().st_size > 0, link
        with Image.open(file) as im:
            assert im.width > 16 and im.height > 16, link
    assert (path.parent / "README.md").is_file() and f"[{NAME}]({NAME}.md)" in (path.parent / "README.md").read_text()


def test_diverged_runs_are_listed_and_left_out_of_the_mean(study):
    store, path, _ = study
    _, children = search_runs(store)
    hot = children[children["tags.variant"] == "hot"]
    assert (hot["tags.outcome"] == "diverged").all() and len(hot) == 2  # the absurd learning rate really diverged
    text = path.read_text()
    every = md_table(text, "Every run")
    for _, run in hot.iterrows():
        cells = every[run["tags.mlflow.runName"]]
        assert (cells["outcome"], cells["in test"], cells["MLflow run id"]) == ("diverged", "no", f"`{run['run_id']}`")
    row = table_rows(text, RESULTS)["hot"]
    assert row[1] == "2" and row[2] == "0 / 2 / 0 / 0 / 0" and row[5] == "–"
    assert "`hot` failed in 2 of 2 seeds (diverged 2)" in text.split("## Verdict\n", 1)[1].split("\n## ", 1)[0]


def test_a_diverged_run_with_a_final_metric_still_stays_out_of_the_mean(study):
    """Even if a diverged run had logged a final KID, the test must not include it (outcome decides, not NaN)."""
    store, _, _ = study
    from studies.report.build import study_runs
    _, children = study_runs(store, NAME)
    order = ["baseline", "maxpool", "hot"]
    runs = stats.run_table(children, order, "kid")
    first = runs.index[runs["variant"] == "baseline"][0]
    before = {r.name: r for r in stats.variant_rows(runs, order, "kid")}["baseline"]
    runs.loc[first, "outcome"] = Outcome.DIVERGED
    after = {r.name: r for r in stats.variant_rows(runs, order, "kid")}["baseline"]
    others = runs[(runs["variant"] == "baseline") & (runs.index != first)]["final_kid"]
    assert after.verdict.finished == before.verdict.finished - 1
    assert after.verdict.mean == pytest.approx(others.mean())
    assert after.count(Outcome.DIVERGED) == 1 and after.verdict.seeds == before.verdict.seeds


def test_provenance_and_ui_view_are_recorded_at_run_time(study):
    store, path, _ = study
    parent, _ = search_runs(store)
    import torch
    assert parent["tags.env.torch"] == torch.__version__ and parent["tags.env.python"]
    assert parent["tags.env.git_commit"] == git_head() and parent["tags.env.git_dirty"] in ("true", "false")
    assert NAME in parent["tags.mlflow.note.content"]
    setup = path.read_text().split("## Setup\n", 1)[1]
    assert parent["tags.env.git_commit"] in setup and f"torch {torch.__version__}" in setup
    exp = store.client.get_experiment_by_name(NAME)
    view = json.loads(exp.tags[f"mlflow.sharedViewState.study-{parent['run_id']}"])
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "variant"}]
    assert "params.`model.d_downsample`" in view["selectedColumns"]
    # what the verdict compares leads (KID is primary here, with its SE), then fidelity/diversity; best values last
    metric_columns = [c for c in view["selectedColumns"] if c.startswith("metrics.")]
    assert metric_columns == ["metrics.`kid/final`", "metrics.`kid/final_std`", "metrics.`pr/final_precision`",
                              "metrics.`pr/final_recall`", "metrics.`dc/final_coverage`", "metrics.`fid/final`",
                              "metrics.`progress/kimg`", "metrics.`kid/best`", "metrics.`fid/best`"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_report_reads_the_final_values_and_the_best_only_where_labelled(study):
    """kid/final and fid/final are what the variant table averages and the verdict tests (KID, primary below
    2,048 samples); kid/best and fid/best appear only in the run table's 'best ... in training' columns. The
    fixture evaluates during training, so each run's best values differ from its final ones."""
    store, path, _ = study
    _, children = search_runs(store)
    ok = children[(children["tags.outcome"] == "finished") & children["metrics.kid/final"].notna()]
    for m in ("fid", "kid"):
        assert (ok[f"metrics.{m}/best"] != ok[f"metrics.{m}/final"]).all(), f"fixture lost its point: {m} best == final"
    text = path.read_text()
    g = lambda x: f"{x:.4g}"  # noqa: E731 (the report's number format)
    every = md_table(text, "Every run")
    for _, run in ok.iterrows():
        cells = every[run["tags.mlflow.runName"]]
        assert cells["final FID"] == g(run["metrics.fid/final"])
        assert cells["final KID ± SE"].split(" ± ")[0] == g(run["metrics.kid/final"])
        assert cells["best FID in training (selected after the fact)"] == g(run["metrics.fid/best"])
        assert cells["best KID in training (selected after the fact)"] == g(run["metrics.kid/best"])
    table = md_table(text, "Results per variant")
    verdict = text.split("## Verdict\n", 1)[1].split("\n## ", 1)[0]
    final = ok.groupby("tags.variant")[["metrics.kid/final", "metrics.fid/final"]].mean()
    best = ok.groupby("tags.variant")[["metrics.kid/best", "metrics.fid/best"]].mean()
    for variant in final.index:
        assert table[variant]["final KID (mean ± sd)"].split(" ± ")[0] == g(final.loc[variant, "metrics.kid/final"])
        assert table[variant]["final FID (mean ± sd)"].split(" ± ")[0] == g(final.loc[variant, "metrics.fid/final"])
    # the effect the table shows and the verdict states is the difference of the final means, not of the best
    delta = final.loc["maxpool", "metrics.kid/final"] - final.loc["baseline", "metrics.kid/final"]
    on_best = best.loc["maxpool", "metrics.kid/best"] - best.loc["baseline", "metrics.kid/best"]
    assert f"{delta:+.3g}" != f"{on_best:+.3g}"
    assert table["maxpool"]["Δ KID vs baseline [95% Welch CI]"].startswith(f"{delta:+.3g} ")
    assert f"{delta:+.3g}" in verdict and f"{on_best:+.3g}" not in verdict


def test_report_is_rebuilt_identically_from_the_store(study, tmp_path):
    store, path, _ = study
    again = write_report(store, NAME, tmp_path / "reports")
    assert again.read_text() == path.read_text()


def test_timelapse_gif_has_one_frame_per_logged_grid_in_training_order(store, tmp_path):
    from studies.report.plots import timelapse_gif
    run = store.start_run("gif", "r", {})
    colors = {3: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # logged out of order on purpose
    for kimg, color in colors.items():
        png = tmp_path / f"fakes{kimg:06d}kimg.png"
        Image.new("RGB", (40, 40), color).save(png)
        run.log_artifact(png, "samples")
    gif, frames = timelapse_gif(store, run.run_id, tmp_path / "t.gif")
    assert frames == 3
    with Image.open(gif) as im:
        seen = []
        for i in range(im.n_frames):
            im.seek(i)
            seen.append(im.convert("RGB").getpixel((20, 30)))
    assert [max(range(3), key=lambda c: px[c]) for px in seen] == [1, 2, 0]  # green (1 kimg), blue (2), red (3)


def test_report_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    code = report_main(["nope", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--reports",
                        str(tmp_path / "reports")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no MLflow experiment 'nope'")
    assert not (tmp_path / "reports").exists()


# ---- the MLflow UI, for real ------------------------------------------------------------------------

def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def mlflow_server(study):
    store, _, tmp = study
    with start_mlflow_server(store.uri, tmp) as base:
        yield base


def browse(steps: list[tuple[str, list[str]]], screenshot: Path, timeout_s: float = 180) -> str:
    """Open each url in turn in headless Chromium, waiting until all its strings are in the page text; then
    close MLflow's assistant side panel (it hides a third of the table) and screenshot the last page."""
    import tempfile
    from playwright.sync_api import TimeoutError as PlaywrightTimeout, sync_playwright
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=args, headless=True,
                                                       viewport={"width": 1500, "height": 820})
        try:
            for url, expect in steps:
                # a fresh page per step: a hash-only goto on a page still loading its first view can be ignored
                # by the single-page app (seen once in CI under load), so every view is loaded from scratch
                page = browser.new_page()
                page.goto(url)
                for attempt in range(2):  # one reload if the first load never shows the words
                    try:
                        page.wait_for_function("words => words.every(w => document.body.innerText.includes(w))",
                                               arg=expect, timeout=timeout_s * 1000 / 2)
                        break
                    except PlaywrightTimeout:
                        if attempt:
                            text = page.inner_text("body")
                            missing = [w for w in expect if w not in text]
                            pytest.fail(f"{url} never showed {missing}; the page said: {text[:1500]!r}")
                        page.reload()
            close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
            if close.count():
                close.first.click()
            page.wait_for_timeout(1000)  # let the table re-lay out before the picture
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
            return page.inner_text("body")
        finally:
            browser.close()


@pytest.mark.slow
def test_mlflow_rest_api_holds_the_runs_and_metrics(study, mlflow_server):
    store, _, _ = study
    parent, children = search_runs(store)
    found = _post(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                  {"experiment_ids": [parent["experiment_id"]], "filter": "tags.study = 'child'", "max_results": 100})
    by_name = {r["info"]["run_name"]: r for r in found["runs"]}
    assert sorted(by_name) == sorted(f"{v}-s{s}" for v in ("baseline", "maxpool", "hot") for s in (0, 1))
    for name, run in by_name.items():
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        assert name == f"{tags['variant']}-s{tags['seed']}"
        assert {"loss/d", "loss/g", "d/real", "d/fake", "perf/img_per_s"} <= set(metrics)
        assert ("fid/final" in metrics) == (tags["outcome"] == "finished")
    rid = by_name["baseline-s0"]["info"]["run_id"]
    with urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key=loss/d") as r:
        steps = [m["step"] for m in json.load(r)["metrics"]]
    assert steps == sorted(steps) and steps[-1] == 64  # logged against images seen, not optimizer steps


@pytest.mark.slow
def test_mlflow_ui_lines_up_variants_in_a_real_browser(study, mlflow_server, tmp_path):
    pytest.importorskip("playwright", reason="the test extra's Playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("Chromium not installed (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    store, path, _ = study
    parent, _ = search_runs(store)
    # the link the report prints, pointed at this server instead of the default port
    link = re.search(r"<(http://127\.0\.0\.1:5000/#/experiments/[^>]+)>", path.read_text()).group(1)
    url = link.replace("http://127.0.0.1:5000", mlflow_server)
    assert url.startswith(f"{mlflow_server}/#/experiments/{parent['experiment_id']}/runs?")
    names = [f"{v}-s{s}" for v in ("baseline", "maxpool", "hot") for s in (0, 1)]
    experiment_page = f"{mlflow_server}/#/experiments/{parent['experiment_id']}"
    text = browse([(experiment_page, [NAME]),  # the plain experiment page renders this experiment
                   (url, ["Group: baseline", "Group: maxpool", "Group: hot", *names])], tmp_path / "mlflow-runs.png")
    assert "fid/final" in text and "d_downsample" in text  # the saved view's columns
    assert text.index("Group: baseline") < text.index("Group: hot") < text.index("Group: maxpool")  # sorted
    with Image.open(tmp_path / "mlflow-runs.png") as im:
        assert im.size == (1500, 820)


def test_recall_and_coverage_get_secondary_verdict_lines_from_welch_and_holm_within_each_metric(store, tmp_path):
    # the fake study's recall is 0.8 - KID - seed/100 and coverage 0.9 - KID - seed/50: `strong`, with the lowest
    # KID, reaches more of the real images on both; `null` differs on neither
    seeds = {"baseline": (0.30, 0.31, 0.29), "strong": (0.20, 0.21, 0.19), "null": (0.30, 0.32, 0.29)}
    _fake_study(store, "diversity-study", {v: [("finished", x) for x in xs] for v, xs in seeds.items()})
    text = write_report(store, "diversity-study", tmp_path / "reports").read_text()
    verdict = text.split("## Verdict\n", 1)[1].split("\n## ", 1)[0]
    primary, secondary = verdict.split("**Diversity (secondary)**")
    assert "**Final KID**: `strong` is better than the baseline" in primary and "recall" not in primary
    from scipy import stats as sps
    runs = mlflow_search_runs(store.uri, "diversity-study")
    children = runs[runs["tags.study"] == "child"]
    for key, label in (("pr/final_recall", "recall"), ("dc/final_coverage", "coverage")):
        values = {v: children[children["tags.variant"] == v][f"metrics.{key}"].to_numpy() for v in seeds}
        p = {v: sps.ttest_ind(values[v], values["baseline"], equal_var=False).pvalue for v in ("strong", "null")}
        holm = _holm(p)
        assert holm["strong"] < 0.05 < holm["null"]
        diff = values["strong"].mean() - values["baseline"].mean()
        ci = sps.ttest_ind(values["strong"], values["baseline"], equal_var=False).confidence_interval(0.95)
        assert (f"`strong`: {label} significantly higher than the baseline's: {values['strong'].mean():.3g} against "
                f"{values['baseline'].mean():.3g}, Δ {diff:+.3g} (95% CI {ci.low:+.3g} to {ci.high:+.3g}, Holm p "
                f"{holm['strong']:.3g})") in secondary
        assert f"`null`: {label}" not in secondary
    assert (tmp_path / "reports" / "diversity-study" / "fidelity_diversity.png").is_file()
    assert "No run evaluated G during training" in text  # no training evaluations: the strip plot of finals
    rows = table_rows(text, RESULTS)
    strong = children[children["tags.variant"] == "strong"]["metrics.pr/final_precision"].to_numpy()
    assert rows["strong"][11] == f"{strong.mean():.4g} ± {strong.std(ddof=1):.2g}"


def test_the_report_carries_its_runs_as_data_equal_to_what_mlflow_holds(study):
    store, path, _ = study
    _, children = search_runs(store)
    csv = pd.read_csv(path.parent / NAME / "runs.csv")
    assert f"({NAME}/runs.csv)" in path.read_text()
    assert sorted(csv["run_id"]) == sorted(children["run_id"]) and (csv["preset"] == "quick").all()
    held = children.set_index("run_id")
    for _, row in csv.iterrows():
        run = held.loc[row["run_id"]]
        assert (row["variant"], str(row["seed"]), row["outcome"]) == (run["tags.variant"], run["tags.seed"],
                                                                        run["tags.outcome"])
        for column, key in (("final_kid", "kid/final"), ("final_kid_std", "kid/final_std"),
                            ("final_recall", "pr/final_recall"), ("final_coverage", "dc/final_coverage")):
            assert row[column] == pytest.approx(run[f"metrics.{key}"], rel=1e-12, nan_ok=True), (column, row["run"])
        assert row["model.d_downsample"] == run["params.model.d_downsample"]  # the varied settings
        assert row["optim.lr_d"] == pytest.approx(float(run["params.optim.lr_d"]))
    assert "train.seed" not in csv and "data.root" not in csv  # seeds have their column; unvaried settings stay out
    assert _verdict_section(path.read_text()) == verdict_from_csv(path.parent / NAME / "runs.csv")


def _verdict_section(text: str) -> list[str]:
    section = text.split("## Verdict\n", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in section.strip().splitlines()]


def test_from_csv_prints_the_verdict_of_the_report_without_a_store(store, tmp_path, capsys):
    _fake_study(store, "csv-study", {"baseline": [("finished", x) for x in (0.30, 0.31, 0.29)],
                                     "better": [("finished", x) for x in (0.20, 0.21, 0.19)],
                                     "fragile": [("diverged", 0.0), ("finished", 0.25), ("finished", 0.27)]})
    text = write_report(store, "csv-study", tmp_path / "reports").read_text()
    capsys.readouterr()
    assert report_main(["csv-study", "--from-csv", "--reports", str(tmp_path / "reports"),
                        "--tracking-uri", "sqlite:////nonexistent/never/opened.db"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert [line[2:] for line in printed] == _verdict_section(text)
    assert any("Diversity (secondary)" in line for line in printed) and any("fragile" in line for line in printed)
    assert report_main(["nothing-here", "--from-csv", "--reports", str(tmp_path / "reports")]) == 2


@pytest.mark.parametrize("name", sorted(p.parent.name for p in (Path(__file__).parents[1] / "reports").glob("*/runs.csv")))
def test_every_committed_report_carries_runs_that_give_its_verdict(name):
    """The committed reports' runs.csv rebuild their verdicts: the failures and the primary answer word for word.
    (Transcribed ones hold values to 4 significant digits, so their intervals may differ in the third digit.)"""
    reports = Path(__file__).parents[1] / "reports"
    shown = _verdict_section((reports / f"{name}.md").read_text())
    again = verdict_from_csv(reports / name / "runs.csv")
    assert again[:2] == shown[:2] and len(again) == len(shown)
    assert any("Diversity (secondary)" in line for line in again) == any("Diversity (secondary)" in line for line in shown)
