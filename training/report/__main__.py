"""``python -m training.report RESULTS_JSON [--out DIR]``: see :func:`training.report.main`."""
import sys

from training.report import main

sys.exit(main())
