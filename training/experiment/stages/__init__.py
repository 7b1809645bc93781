"""One module per stage kind of the experiment runner: each owns its stages' keys (what determines the
output), what they need and their run. A new stage is a new module here plus one line in
``training.experiment.runner.ExperimentRunner.build``."""
