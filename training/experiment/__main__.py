"""``python -m training.experiment``."""
from training.experiment.cli import main

raise SystemExit(main())
