"""Command-line entry points, one package each, and what they share (cli, lr_handoff, mlflow_view).

    python -m studies.run pooling        # an ablation study, then its report
    python -m studies.report pooling     # the report again, from the tracking store
    python -m studies.search --trials 20 # the learning-rate search
    python -m studies.bench              # the trainer against a plain PyTorch loop
"""
