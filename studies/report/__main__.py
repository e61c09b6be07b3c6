"""Write reports/NAME.md (and its pictures in reports/NAME/) from what MLflow holds, never from memory.

    python -m studies.report pooling                          # latest study of the 'pooling' experiment
    python -m studies.report pooling --parent RUN_ID          # a specific study invocation
    python -m studies.report pooling --tracking-uri sqlite:///elsewhere/mlflow.db --reports /tmp/reports
    python -m studies.report pooling --from-csv               # the verdict again from reports/pooling/runs.csv
    python -m studies.report                                  # reports/README.md and the campaign summary only

`python -m studies.run` calls this at the end. Every number, curve and image is read back from the tracking
store (params, tags, metric histories, artifacts), so a report can be rebuilt or audited at any later time;
reports/README.md, an index over every report in the folder with the campaign summary (every variant of
every report, from their runs.csv), is rewritten alongside; without a name, only it is, with no store at all.
--from-csv recomputes the verdict from the runs a committed report carries as data, with no store, and prints it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.tracking import Store
from studies.cli import add_flags, command
from core.errors import UserError
from studies.report.build import write_report
from studies.report.evidence import verdict_from_csv
from studies.report.index import write_index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studies.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="experiment (ablation study) name, e.g. pooling or pooling@norm=after_act "
                   "(default: none, only REPORTS/README.md and its campaign summary are rebuilt, from the runs.csv)")
    p.add_argument("--parent", default=None, help="parent run id of the study (default: the latest study)")
    add_flags(p, "--tracking-uri")
    p.add_argument("--reports", type=Path, default=Path("reports"), help="output folder (default: reports)")
    p.add_argument("--from-csv", action="store_true", help="print the verdict recomputed from REPORTS/NAME/runs.csv "
                   "instead of writing the report from the store (default: off)")
    return p


def report(args: argparse.Namespace) -> int:
    if args.name is None:
        if args.from_csv or args.parent:
            raise UserError("--from-csv and --parent need a report's name")
        if not args.reports.is_dir():
            raise UserError(f"no folder {args.reports}: nothing to summarise")
        print(f"wrote {write_index(args.reports)}")
        return 0
    if args.from_csv:
        print("\n".join(f"- {line}" for line in verdict_from_csv(args.reports / args.name / "runs.csv")))
        return 0
    t0 = time.perf_counter()
    path = write_report(Store(args.tracking_uri), args.name, args.reports, args.parent)
    print(f"wrote {path} and {path.parent / 'README.md'} in {time.perf_counter() - t0:.1f} s")
    return 0


main = command(build_parser, report, interrupted="interrupted: a report is swapped in only when it is complete")


if __name__ == "__main__":
    sys.exit(main())
