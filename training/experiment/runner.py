"""The experiment runner: checks the inputs, builds the plan of stages from the stage modules
(``stages/<name>.py``: each owns its stage's key, what it needs and its run) and collects the results.

Stage order (the plan runs them in this order, each after what it needs): ``protect``, ``stage1``
(when a method uses the LoRD; ``stage1_onebranch`` when one uses the one-branch control; with ``[attack]
defense_aware`` the Stage-1 stages come first, since the protection runs against the LoRD), ``detect``
(when there is a LoRD), ``purify/*``,
``reference``, then per Stage-2 run ``train/<id>``, ``sample/<id>``, ``score/<id>`` and, with
``[metrics] heldout_images``, ``heldout/<id>``.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable

from lord_ops.datasets import image_files
from lord_ops.format import load_lord_file
from lord_ops.safetensors_file import LoRDFileError
from lord_ops.weights import MetricWeightsError
from training.experiment_config import ConfigError, Experiment
from training.experiment.context import ExperimentContext
from training.experiment.images import read_png
from training.experiment.methods import plan_variants
from training.experiment.results import collect_results
from training.experiment.stages import detect, heldout, protect, purify, reference, sample, score, stage1, train


class ExperimentRunner:
    """One experiment: ``check_inputs()`` (loads the LoRD and metric weight files once), ``build()``
    (reads the subject images, hashes the checkpoint, plans the stages), then ``ctx.plan.run()`` and
    ``results(report_dir)``. The constructor does no work."""

    def __init__(self, exp: Experiment, log: Callable[[str], None] = print):
        self.exp, self.log = exp, log
        self.ctx = ExperimentContext(exp, log)
        self.sweep: dict[str, list] = {}

    @property
    def plan(self):
        return self.ctx.plan

    def check_inputs(self, metric_weights: bool = True) -> None:
        """What would otherwise fail hours into a run: Stage-1 captions, the LoRD file, the attack
        target and the metric weight files (each loaded once). Raises ConfigError naming the field."""
        exp = self.exp
        where = lambda field: f"{exp.config_path}: {field}"  # noqa: E731
        if exp.stage1_data is not None and exp.stage1_caption is None:
            for image in image_files(exp.stage1_data):
                caption = image.with_suffix(".txt")
                if not caption.is_file() or not caption.read_text(encoding="utf-8", errors="replace").strip():
                    raise ConfigError(f"{where('[stage1] data')}: {image.name} has no (or an empty) caption file "
                                      f"{caption.name}; add one, or set [stage1] caption for every image")
        if exp.stage1_lord is not None:
            try:
                load_lord_file(exp.stage1_lord)
            except LoRDFileError as e:
                raise ConfigError(f"{where('[stage1] lord')}: {e}") from e
        if exp.attack_target is not None:
            try:
                read_png(exp.attack_target)
            except Exception as e:  # noqa: BLE001 -- PIL raises many types
                raise ConfigError(f"{where('[attack] target')}: cannot read {exp.attack_target} as an image "
                                  f"({type(e).__name__}: {e})") from e
        if metric_weights:
            m, rt = exp.metrics, self.ctx.rt
            for kind, field, given in (("clip_iqa", "clip_iqa_weights", m.clip_iqa_weights),
                                       ("inception", "inception_weights", m.inception_weights),
                                       ("extractor", "extractor_weights", m.extractor_weights)):
                if given is not None:
                    try:
                        rt.metric_model(kind)
                    except (MetricWeightsError, ValueError, RuntimeError) as e:
                        raise ConfigError(f"{where('[metrics] ' + field)}: {e}") from e
            if m.subject_class is not None:
                classes = list(getattr(rt.metric_model("extractor"), "classes", None) or [])
                if m.subject_class not in classes:
                    raise ConfigError(f"{where('[metrics] subject_class')}: {m.extractor} "
                                      + (f"does not classify {m.subject_class!r}; its classes: {', '.join(classes)}"
                                         if classes else "is a feature extractor without classes (no subject accuracy)"))

    def build(self) -> None:
        """Read the inputs and plan every stage (keys hash the checkpoint, the images and the settings)."""
        ctx = self.ctx
        ctx.prepare()
        variants, self.sweep = plan_variants(ctx)
        protecting, adapters = protect.stages(ctx), stage1.stages(ctx, variants)
        # the adaptive attacker protects against the Stage-1 LoRD: train it first
        first = adapters + protecting if ctx.exp.attack_defense_aware else protecting + adapters
        planned = [*first, *detect.stages(ctx, variants), *purify.stages(ctx, variants), *reference.stages(ctx)]
        trained = set()
        for v in variants:
            if v.train_id not in trained:  # gate variants that train alike share one Stage-2 run
                trained.add(v.train_id)
                planned.append(train.stage(ctx, v))
            planned += [sample.stage(ctx, v), score.stage(ctx, v)]
            planned += [st for st in (heldout.stage(ctx, v),) if st is not None]
        for st in planned:
            ctx.plan.add(st)

    def stage_names(self, patterns) -> list[str]:
        """The planned stages matching the glob ``patterns`` (ConfigError when none does)."""
        chosen = [n for n in self.plan.stages if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not chosen:
            raise ConfigError(f"--only {','.join(patterns)} matches no stage; stages: {', '.join(self.plan.stages)}")
        return chosen

    def results(self, report_dir: Path) -> dict:
        """``results.json`` of the finished plan (sample paths relative to ``report_dir``)."""
        return collect_results(self.ctx, self.sweep, report_dir)
