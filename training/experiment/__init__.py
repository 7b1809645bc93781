"""Measure the defense end to end: ``python -m training.experiment --config exp.toml``.

Protocol mode (the paper's Sec. IV, Table I and Fig. 7), on one subject:

1. ``protect``: the clean instance images are protected with an attack preset (mist-v2 by default);
2. ``stage1``: a LoRD is trained on the Stage-1 data set (or ``[stage1] lord`` gives one);
3. ``detect``: the LoRD Detect score of every clean and protected instance image (ROC, AUROC);
4. ``purify/jpeg``, ``purify/diffpure``: the protected images purified (the baselines);
5. per method: ``train/<id>`` (a Stage-2 DreamBooth-LoRA), ``sample/<id>`` (``[sampling] images``
   images of the instance prompt), ``score/<id>`` (CLIP-IQA, FID + KID, or FD/KD of another extractor
   against ``reference``, the clean instance images by default). Method ids are
   ``<stage-2 mode>-<training images>``: ``plain-clean`` (Clean), ``plain-protected`` (Attacking),
   ``pgd2_defense-protected``, ``plain-jpeg``, ``plain-diffpure``, ``lord-protected`` (LoRD), and for
   the Fig. 7 sweep ``plain-mix<k>`` / ``lord-mix<k>`` (k of the N images protected);
6. ``report/``: ``results.json``, ``table1.md``, ``fig7.png``, grids, ``roc.png``, ``index.html``.

Artist mode (``[experiment] mode = "artist"``) starts from the artist's protected images as published
(and the originals when they have them) and answers: how much of the damage do LoRD, JPEG and
DiffPure-style purification undo?

Layout: ``runner`` (plan + input checks), ``context`` (what stages share: models, image sets, pieces
of keys), ``methods`` (the Stage-2 runs and their image sets), ``stages/<name>`` (one module per
stage: its key, what it needs, its run), ``results`` (``results.json``), ``cli`` (the command).

Every stage is cached under ``<output>/stages/<name>/`` and resumable (a finished stage is never
recomputed; a killed run started again continues, training from its checkpoint and sampling from the
images already written). ``--only`` runs some stages (and what they need), so independent stages can
run as separate processes or on separate GPUs on one shared output folder; ``--list`` shows the plan.
Exit status: 0 done, 1 a stage failed, 2 bad config or arguments, 130 interrupted.
"""
from training.experiment.cli import main

__all__ = ["main"]
