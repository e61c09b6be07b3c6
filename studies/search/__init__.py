"""`python -m studies.search`: the Optuna learning-rate search (orchestrate, trial, storage, summary, handoff).

Other commands use it only through the names below: studies.run takes its learning rates from a search with
`choose_lr` (after `check_lr_request` for a dry run), exchanging the typed values of studies.lr_handoff; and
studies.run's workers take a study's runs from a `RunQueue` (queue.py) in the same Optuna storages; and
`studies.run NAME --tune N` searches every variant alike with `tune` (tune.py: `check_tune` first, `trials_left`
for the ETA).
"""

from studies.search.handoff import check_lr_request, choose_lr
from studies.search.queue import RunQueue
from studies.search.tune import check_tune, trials_left, tune

__all__ = ["RunQueue", "check_lr_request", "check_tune", "choose_lr", "trials_left", "tune"]
