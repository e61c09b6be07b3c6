"""The MLflow UI view of a study: child runs only, grouped by variant, sorted by name, the deciding columns.

    python -m studies.run pooling        # saves the view on the 'pooling' experiment
    python -m studies.report pooling     # its "Open these runs in MLflow" section links to it (view_url)

MLflow 3 keeps a runs-table view (filter, sort, columns, grouping) as an experiment tag and opens it from a
link (`viewStateShareKey`), so a study saves one and its report links to it: the variants and their seeds
line up, averaged per variant, without the user typing a filter. The plain link is the fallback for stores
that cannot hold experiment tags.
"""

from __future__ import annotations

from urllib.parse import urlencode

from core import records as rec

def columns(primary: str) -> list[str]:
    """What the verdict compares first: the primary final metric and its standard error (KID's; FID has none),
    then precision, recall and coverage, the other metric, progress and outcome; best-of-training values, which
    the report calls selected after the fact, last."""
    other = rec.other_family(primary)
    metrics = [rec.final_key(primary), *([rec.final_std_key(primary)] if primary == rec.KID else []),
               *(rec.final_key(m) for m in (rec.PRECISION, rec.RECALL, rec.COVERAGE)), rec.final_key(other),
               rec.KIMG]
    return [*(f"metrics.`{k}`" for k in metrics), *(f"tags.`{t}`" for t in (rec.VARIANT, rec.SEED, rec.OUTCOME)),
            *(f"metrics.`{rec.best_key(m)}`" for m in (primary, other))]


UI = "http://127.0.0.1:5000"  # where `mlflow ui --host 127.0.0.1` serves


def view_key(parent_id: str) -> str:
    return f"study-{parent_id}"


def child_filter(parent_id: str) -> str:
    return f"tags.{rec.STUDY} = '{rec.CHILD}' and tags.{rec.PARENT_RUN} = '{parent_id}'"


def study_view(parent_id: str, varied_keys: list[str], primary: str) -> dict[str, object]:
    """The saved view's state, in the MLflow UI's own keys (search facets plus runs-table UI state); `primary`
    is the study's primary metric family (rec.KID, rec.FID), whose final value leads."""
    return {
        "searchFilter": child_filter(parent_id), "orderByKey": f"tags.`{rec.RUN_NAME}`", "orderByAsc": True,
        "selectedColumns": [*columns(primary), *(f"params.`{k}`" for k in varied_keys)],
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": rec.VARIANT}]},
        "runsHiddenMode": "SHOW_ALL",  # the UI hides runs past the 10th by default: a study has more
    }


def view_url(experiment_id: str, parent_id: str, base: str = UI) -> str:
    """The runs page opened on the study's saved view (model-training mode, not MLflow 3's GenAI overview)."""
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": view_key(parent_id)})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def filter_url(experiment_id: str, parent_id: str, base: str = UI) -> str:
    """The same runs, filtered and sorted by URL alone, for when no saved view exists."""
    query = urlencode({"workflowType": "machine_learning", "searchFilter": child_filter(parent_id),
                       "orderByKey": f"tags.`{rec.RUN_NAME}`", "orderByAsc": "true"})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"
