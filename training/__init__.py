"""The pack's command-line entry points: ``python -m training.train`` (Stage 1 / Stage 2),
``python -m training.attack`` (batch protection) and ``python -m training.experiment`` (the evaluation
runner and its report). Run them from the repository root (or with it on ``sys.path``)."""
