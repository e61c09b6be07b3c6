"""`python -m studies.search`: the Optuna learning-rate search (orchestrate, trial, storage, summary, handoff).

Other commands use it only through the names below: studies.run takes its learning rates from a search with
`choose_lr` (after `check_lr_request` for a dry run), exchanging the typed values of studies.lr_handoff.
"""

from studies.search.handoff import check_lr_request, choose_lr

__all__ = ["check_lr_request", "choose_lr"]
