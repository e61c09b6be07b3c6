"""`python -m studies.report`: a study's report rebuilt from the tracking store alone (build, stats, sections,
plots, index).

Other commands use it only through `write_report` (studies.run writes the report at the end of a study) and
`winners` (what the campaign summary shows better, which `studies.run combine` stacks) and `set_apart`
(what it shows better against a baseline of its own, which combine leaves out).
What it may import is a test's rule (tests/test_architecture.py): from core only the tracking store, errors,
the config's defaults and the metric names; the ablation registry for rationales; studies.verdict for the
statistics; never a trainer or Optuna.
"""

from studies.report.build import write_report
from studies.report.summary import set_apart, winners

__all__ = ["set_apart", "winners", "write_report"]
