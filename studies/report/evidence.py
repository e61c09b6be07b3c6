"""A report's evidence as data: reports/NAME/runs.csv read back, for a verdict or a summary without a store.

    python -m studies.report pooling --from-csv     # the verdict from reports/pooling/runs.csv alone

The file is written by studies.report.sections.evidence (one row per child run, the preset, primary metric and
final sample count on every row); a column a report predates is a metric not recorded, as a store says of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core import records as rec
from core.errors import UserError
from studies.report import stats


@dataclass(frozen=True)
class CsvStudy:
    """A report's runs as its runs.csv holds them, ready for studies.report.stats."""
    runs: pd.DataFrame  # as stats.run_table gives them from a store (absent metrics marked not recorded)
    order: list[str]  # variants, baseline first
    metric: str  # the primary metric
    final_samples: int
    preset: str


def read_runs_csv(path: Path) -> CsvStudy:
    """A report's runs.csv read back (a UserError for a missing or malformed file)."""
    if not path.is_file():
        raise UserError(f"no {path}: a report written before its runs were kept as data, or no report of that name")
    try:
        # only an empty cell is missing: a variant may be called "null" or "NA"
        runs = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"variant": str, "run": str, "run_id": str})
        runs["outcome"] = runs["outcome"].map(rec.Outcome.read)
        runs = runs.rename(columns={f"final_{rec.KID}_std": "kid_std"})
        metric, final_samples = str(runs["primary_metric"].iloc[0]), int(runs["final_samples"].iloc[0])
    except (KeyError, ValueError, IndexError, pd.errors.ParserError) as exc:
        raise UserError(f"{path} is not a report's runs.csv ({type(exc).__name__}: {exc})") from None
    # a report from before a metric existed has no column for it: not recorded, as run_table says of a store
    absent = [m for m in (*rec.FAMILIES, *rec.FIDELITY_DIVERSITY) if f"final_{m}" not in runs]
    for m in absent:
        runs[f"final_{m}"] = float("nan")
    runs.attrs["not_recorded"] = [f"metrics.{rec.final_key(m)}" for m in absent]
    order = list(dict.fromkeys(runs["variant"]))  # the report's order, baseline first
    return CsvStudy(runs, order, metric, final_samples, str(runs["preset"].iloc[0]))


def verdict_from_csv(path: Path) -> list[str]:
    """The verdict's lines (primary, then secondary) recomputed from a report's runs.csv alone, no store."""
    study = read_runs_csv(path)
    rows = stats.variant_rows(study.runs, study.order, study.metric)
    return (stats.verdict_lines(rows, study.metric, study.final_samples)
            + stats.secondary_lines(stats.secondary_verdicts(study.runs, study.order)))
