"""Command-line entry points: `python -m studies.run`, `python -m studies.report`."""
