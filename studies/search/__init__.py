"""`python -m studies.search`: the Optuna learning-rate search (orchestrate, trial, storage, summary, handoff).

Other commands use it only through the names below: studies.run takes its learning rates from a search with
`choose_lr` (after `check_lr_request` for a dry run), exchanging the typed values of studies.lr_handoff; and
its run queue (studies/run/queue.py) opens the same Optuna storages, with heartbeats (`open_storage`).
"""

from studies.search.handoff import check_lr_request, choose_lr
from studies.search.storage import Heartbeat, open_storage, quiet_experimental

__all__ = ["Heartbeat", "check_lr_request", "choose_lr", "open_storage", "quiet_experimental"]
