"""reports/README.md: one table over every report in the folder and the campaign summary (studies/report/summary.py),
rebuilt whenever a report is written.

    python -m studies.report pooling     # rewrites reports/pooling.md, then reports/README.md from every report

Each report carries its headline as a one-line JSON comment at its top (INDEX_MARK), so the index needs no
tracking store: reports made from different stores, or copied in from another machine, are listed alike.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from studies.report.summary import summary_section

INDEX_MARK = "report-index:"
_LINE = re.compile(r"<!-- " + re.escape(INDEX_MARK) + r" (\{.*\}) -->")


def read_headline(path: Path) -> dict | None:
    """The headline a report wrote about itself, or None for a markdown file that is not a report."""
    with path.open(encoding="utf-8") as f:
        match = _LINE.match(f.readline().strip())
    try:
        return json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        return None


def write_index(reports_dir: Path) -> Path:
    """Rewrite reports_dir/README.md from the headlines of every reports_dir/*.md."""
    rows = []
    for path in sorted(reports_dir.glob("*.md")):
        head = read_headline(path) if path.name != "README.md" else None
        if head is None:
            continue
        rows.append({"study": f"[{head['experiment']}]({path.name})", "started": head.get("started", "?"),
                     "preset": head.get("preset", "?"), "variants": ", ".join(head.get("variants", [])),
                     "seeds": head.get("seeds", "?"), "primary metric": head.get("metric", "fid").upper(),
                     "runs in test / total": f"{head.get('counted', '?')} / {head.get('runs', '?')}",
                     "best variant": head.get("best") or "–", "effect vs baseline": head.get("effect", "–"),
                     "verdict": head.get("verdict", "")})
    table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) if rows else "_No reports yet._"
    text = "\n".join([
        "# Ablation reports", "",
        "One row per study reported so far; each report is regenerated from MLflow with "
        "`python -m studies.report NAME`, which also rewrites this index and the campaign summary below. Best "
        "variant: the one with the largest improvement in the study's primary metric that is significant (Welch's "
        "t-test over seeds, Holm-adjusted across the variants) and that does not fail significantly more often "
        "than the baseline; effect: its mean final value minus the baseline's, with the 95% Welch interval "
        "(negative is better). Every variant, improvements and harms, is in the summary.", "", table, "",
        *summary_section(reports_dir)])
    path = reports_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
