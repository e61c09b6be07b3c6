"""`python -m studies.bench`: the trainer against a plain PyTorch loop (measure, suite, plain, resize, table)."""
