"""Replicated, paired experiments on the lab model: does LoRD defend? (EVIDENCE.md declares them.)

A *replicate* is one whole run of the lab protocol (``lab/experiment.py``'s config: protect the
subject, Stage 1, Stage 2 per method, sample, score) with **its own subject** (8 bags of the test
split, disjoint across replicates: ``lab.data.replicate_folder``) and **its own seed** (Stage 1,
Stage 2, the attack and the samples: :func:`replicate_seed`); everything else is equal. Each
replicate is an ordinary ``training.experiment`` run in ``<out>/<experiment>/rNNN/`` (resumable,
stage by stage). Replicates are independent, so several processes share the work
(``--worker k/K`` takes the replicates ``r`` with ``r % K == k``).

Seed ranges (never reuse an exploration replicate to confirm): replicates 0-9 are **exploration**
(the pilot), 10-31 **confirmatory**; replicate ``r`` uses seed ``1000 + r`` and the bags
``lab.data.replicate_bag_indices(r)``.

``python -m lab.evidence run defense --scale demo --worker 0/2``: run (or resume) replicates;
``python -m lab.evidence report defense``: the paired analysis (``lord_ops.analysis``) of every
finished replicate -> ``analysis.json``, ``analysis.md`` and ``forest.png`` in ``<out>/<experiment>/``.

Each experiment names its lab model (``Declared.lab``, ``lab.experiment.LABS``): lab model 1 (32 px
Fashion-MNIST, subject "bag") unless it says ``textures`` (lab model 2, 64 px, subject "wood"); ``--parts``
and ``--classifier`` run it on a retrained model instead of the shipped one.

Metrics per method and replicate: the **held-out denoising loss** (primary; 32 bags never trained on,
10 timesteps x 4 seeded noise draws, the same for every method: ``lord_ops.comfy.subject_loss``),
subject accuracy and FD (lab classifier) of the samples (secondary).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from lab import carry
from lab.experiment import ATTACK, LABS
from training.experiment_config import Experiment as ExperimentSettings

SEED_BASE = 1000
# finished replicates' results.json, kept in the repository (``<folder>/rNNN.json``): an output folder is
# scratch (hours of cached stages), the archive is what a later session's report and run read back
ARCHIVE = Path(__file__).resolve().parent.parent / "docs" / "evidence" / "runs"
EXPLORATION = range(0, 10)
CONFIRMATORY = range(10, 32)


def replicate_seed(replicate: int) -> int:
    """The one seed of replicate ``replicate`` (Stage 1, Stage 2, attack, samples)."""
    return SEED_BASE + int(replicate)


@dataclasses.dataclass(frozen=True)
class Contrast:
    """A paired difference over replicates: ``sum(weight * value of method)`` per replicate."""

    name: str
    weights: tuple  # ((method, weight), ...)
    question: str

    @property
    def methods(self) -> tuple:
        return tuple(m for m, _ in self.weights)


# the runner's purification settings (training.experiment_config's defaults, which lab.experiment's configs keep),
# named in the purifier contrasts' questions
_RUNNER = {f.name: f.default for f in dataclasses.fields(ExperimentSettings)}
PURIFIER_SETTINGS = (
    ("noise", f"Gaussian-noise purification (sigma {_RUNNER['noise_sigma']:g} of the [0, 1] range)"),
    ("jpeg", f"JPEG purification (quality {_RUNNER['jpeg_quality']})"),
    ("diffpure", f"DiffPure-style purification (noised to strength {_RUNNER['diffpure_strength']:g}, denoised by the "
                 "base model)"),
)
# the paper's Fig. 7 (share of protected images, 0 / 2 / 4 / 6 / 8 of 8): each series' methods at those points
SHARE_SERIES = {"plain LoRA": ("clean", "plain_mix2", "plain_mix4", "plain_mix6", "attacking"),
                "LoRD": ("lord_clean", "lord_mix2", "lord_mix4", "lord_mix6", "lord"),
                "LoRD, B' off at sampling": ("lord_clean_gl0", "lord_gl0_mix2", "lord_gl0_mix4", "lord_gl0_mix6",
                                             "lord_gl0")}
SHARE_POINTS = (0, 2, 4, 6, 8)


def _slope_contrast(name: str, series: str, question: str, minus: str | None = None) -> "Contrast":
    """The least-squares slope per protected image over :data:`SHARE_POINTS` of a :data:`SHARE_SERIES` series
    (weights (x - 4) / 40; x = 4 weighs 0), minus another series' slope when ``minus`` is given."""
    mean = sum(SHARE_POINTS) / len(SHARE_POINTS)
    norm = sum((x - mean) ** 2 for x in SHARE_POINTS)
    weights = [(m, (x - mean) / norm) for m, x in zip(SHARE_SERIES[series], SHARE_POINTS) if x != mean]
    if minus:
        weights += [(m, -(x - mean) / norm) for m, x in zip(SHARE_SERIES[minus], SHARE_POINTS) if x != mean]
    else:
        question += "change of the metric per protected image of 8 (least-squares slope over 0-8)"
    return Contrast(name, tuple(weights), question)


CONTRASTS = (
    Contrast("A", (("attacking", 1), ("clean", -1)),
             "attack effect: plain LoRA on protected minus plain LoRA on clean images"),
    Contrast("removal_lord", (("lord", 1), ("lord_clean", -1), ("attacking", -1), ("clean", 1)),
             "LoRD's protected-minus-clean difference minus A (negative: LoRD removes part of the attack's damage)"),
    Contrast("lord_vs_plain_prot", (("lord", 1), ("attacking", -1)),
             "LoRD on protected minus plain LoRA on protected (what a user gains from LoRD on protected images)"),
    Contrast("lord_vs_onebranch_prot", (("lord", 1), ("onebranch", -1)),
             "LoRD on protected minus the one-branch control on protected (LoRD beyond extra pre-training)"),
    Contrast("cost_lord", (("lord_clean", 1), ("clean", -1)),
             "LoRD on clean minus plain LoRA on clean (LoRD's effect when nothing is attacked)"),
    Contrast("attack_under_lord", (("lord", 1), ("lord_clean", -1)),
             "the attack's effect with LoRD live: LoRD on protected minus LoRD on clean"),
    Contrast("removal_onebranch", (("onebranch", 1), ("onebranch_clean", -1), ("attacking", -1), ("clean", 1)),
             "the one-branch control's protected-minus-clean difference minus A"),
    Contrast("cost_onebranch", (("onebranch_clean", 1), ("clean", -1)),
             "one-branch control on clean minus plain LoRA on clean (the effect of Stage-1 pre-training alone)"),
    Contrast("lord_vs_onebranch_clean", (("lord_clean", 1), ("onebranch_clean", -1)),
             "LoRD on clean minus the one-branch control on clean"),
    # the oracle gate factorial (lord_g<t><s>: gate t in Stage-2 training, s at sampling; l learned, 0, 1)
    Contrast("removal_g10", (("lord_g10", 1), ("lord_clean_g10", -1), ("attacking", -1), ("clean", 1)),
             "B' on in training and off at sampling (gate 1 / 0): its protected-minus-clean difference minus A "
             "(negative: B' absorbed part of the attack)"),
    Contrast("g10_vs_plain_prot", (("lord_g10", 1), ("attacking", -1)),
             "gate 1 in training / 0 at sampling on protected minus plain LoRA on protected"),
    Contrast("lord_vs_g00_prot", (("lord", 1), ("lord_g00", -1)),
             "LoRD with its learned gate minus the same LoRD with the gate forced to 0 throughout (its A, B "
             "branch alone), on protected: does the gate / B' matter at all?"),
    Contrast("g10_vs_lord_prot", (("lord_g10", 1), ("lord", -1)),
             "the oracle gate (1 in training, 0 at sampling) minus the learned gate, on protected"),
    Contrast("removal_g00", (("lord_g00", 1), ("lord_clean_g00", -1), ("attacking", -1), ("clean", 1)),
             "gate 0 throughout: protected-minus-clean difference minus A"),
    Contrast("removal_g11", (("lord_g11", 1), ("lord_clean_g11", -1), ("attacking", -1), ("clean", 1)),
             "gate 1 throughout: protected-minus-clean difference minus A"),
    # the B'-strength sweep at sampling (lord_b<k>: B' x k; lord_gl0: gate forced to 0 at sampling = B' x 0)
    Contrast("gl0_vs_lord_prot", (("lord_gl0", 1), ("lord", -1)),
             "B' off at sampling (gate forced to 0, i.e. B' x 0) minus the learned LoRD (B' x 1), on protected "
             "(negative: B' hurts the model at sampling)"),
    Contrast("gl0_vs_onebranch_prot", (("lord_gl0", 1), ("onebranch", -1)),
             "LoRD with B' off at sampling minus the one-branch control, on protected (both sample A, B alone: "
             "does training with B' live leave a better A, B and LoRA than training without it?)"),
    Contrast("b05_vs_lord_prot", (("lord_b05", 1), ("lord", -1)), "B' x 0.5 at sampling minus B' x 1, on protected"),
    Contrast("b2_vs_lord_prot", (("lord_b2", 1), ("lord", -1)), "B' x 2 at sampling minus B' x 1, on protected"),
    Contrast("removal_gl0", (("lord_gl0", 1), ("lord_clean_gl0", -1), ("attacking", -1), ("clean", 1)),
             "LoRD with B' off at sampling: its protected-minus-clean difference minus A"),
    Contrast("removal_b05", (("lord_b05", 1), ("lord_clean_b05", -1), ("attacking", -1), ("clean", 1)),
             "LoRD with B' x 0.5 at sampling: its protected-minus-clean difference minus A"),
    Contrast("removal_b2", (("lord_b2", 1), ("lord_clean_b2", -1), ("attacking", -1), ("clean", 1)),
             "LoRD with B' x 2 at sampling: its protected-minus-clean difference minus A"),
    # the paper's Fig. 7 (share of protected images, 0 / 2 / 4 / 6 / 8 of 8): least-squares slopes per
    # protected image over the five points (weights (x - 4) / 40 for x = 0, 2, 4, 6, 8; x = 4 weighs 0)
    *(_slope_contrast(name, series, what) for name, series, what in (
        ("slope_plain", "plain LoRA", "plain LoRA: "), ("slope_lord", "LoRD", "LoRD: "),
        ("slope_gl0", "LoRD, B' off at sampling", "LoRD with B' off at sampling: "))),
    *(_slope_contrast(name, series, what, minus="plain LoRA") for name, series, what in (
        ("slope_lord_vs_plain", "LoRD", "LoRD's slope minus the plain LoRA's (negative: LoRD flattens the damage "
                                        "curve, the paper's Fig. 7)"),
        ("slope_gl0_vs_plain", "LoRD, B' off at sampling", "the slope of LoRD with B' off at sampling minus the "
                                                           "plain LoRA's (negative: it flattens the damage curve)"))),
    Contrast("A_mix4", (("plain_mix4", 1), ("clean", -1)), "plain LoRA with 4 of 8 images protected minus on clean"),
    Contrast("lord_vs_plain_mix4", (("lord_mix4", 1), ("plain_mix4", -1)),
             "LoRD minus plain LoRA, both with 4 of 8 images protected"),
    Contrast("removal_mix4", (("lord_mix4", 1), ("lord_clean", -1), ("plain_mix4", -1), ("clean", 1)),
             "with 4 of 8 protected: LoRD's difference to its clean run minus the plain LoRA's"),
    Contrast("gl0_vs_plain_mix4", (("lord_gl0_mix4", 1), ("plain_mix4", -1)),
             "LoRD with B' off at sampling minus plain LoRA, both with 4 of 8 images protected"),
    # the adaptive attacker against the unaware one (same replicates, subjects, seeds and Stage 1)
    Contrast("survival_lord", (("lord", 1), ("attacking", -1), ("lord_unaware", -1), ("attacking_unaware", 1)),
             "LoRD's removal under the defense-aware attack minus its removal under the unaware one (positive: "
             "the attacker who knows the LoRD takes back part of what it removed)"),
    Contrast("survival_gl0", (("lord_gl0", 1), ("attacking", -1), ("lord_gl0_unaware", -1), ("attacking_unaware", 1)),
             "the same for LoRD with B' off at sampling"),
    Contrast("A_aware_vs_unaware", (("attacking", 1), ("attacking_unaware", -1)),
             "plain LoRA on the defense-aware copies minus on the unaware copies"),
    Contrast("gl0_vs_unaware_prot", (("lord_gl0", 1), ("lord_gl0_unaware", -1)),
             "LoRD with B' off at sampling on this attacker's copies minus on the unaware attacker's (positive: the "
             "defended user is worse off against this attacker)"),
    Contrast("lord_vs_unaware_prot", (("lord", 1), ("lord_unaware", -1)),
             "the same for LoRD with B' live"),
    # Stage-1 data from another attack than the threat's (ASPL, ASPL + ACE) against the matched ACE-32 Stage 1
    # ('matched''s runs of the same replicates, read under the aliases *_ace)
    Contrast("removal_lord_vs_ace", (("lord", 1), ("lord_clean", -1), ("lord_ace", -1), ("lord_clean_ace", 1)),
             "LoRD's protected-minus-clean difference with this Stage-1 source minus with the matched ACE-32 Stage 1 "
             "(positive: this source removes less)"),
    Contrast("removal_gl0_vs_ace", (("lord_gl0", 1), ("lord_clean_gl0", -1), ("lord_gl0_ace", -1),
                                    ("lord_clean_gl0_ace", 1)),
             "the same with B' off at sampling"),
    Contrast("cost_g10", (("lord_clean_g10", 1), ("clean", -1)),
             "gate 1 in training / 0 at sampling on clean minus plain LoRA on clean"),
    # each purification baseline against the plain LoRA on the protected images (<purifier>_vs_plain_prot)
    *(Contrast(f"{purifier}_vs_plain_prot", ((purifier, 1), ("attacking", -1)),
               f"{what} of the protected images, then a plain LoRA, minus the plain LoRA on the protected images "
               "(negative: the purifier helps)") for purifier, what in PURIFIER_SETTINGS),
    # the Stage-2 PGD-2 defense (adversarial training on PGD-2 copies of the protected images; the paper's baseline)
    Contrast("pgd2_vs_plain_prot", (("pgd2_defense", 1), ("attacking", -1)),
             "the Stage-2 PGD-2 defense on protected minus plain LoRA on protected (negative: it helps)"),
    Contrast("lord_vs_pgd2_prot", (("lord", 1), ("pgd2_defense", -1)),
             "LoRD on protected minus the Stage-2 PGD-2 defense on protected (negative: LoRD beats the paper's "
             "baseline)"),
)

# (defended method on protected images, the same on clean images): the share of A remaining is reported for each
REMAINING_PAIRS = (("lord", "lord_clean"), ("onebranch", "onebranch_clean"), ("lord_g10", "lord_clean_g10"),
                   ("lord_gl0", "lord_clean_gl0"), ("lord_b05", "lord_clean_b05"), ("lord_b2", "lord_clean_b2"),
                   ("lord_ace", "lord_clean_ace"), ("lord_gl0_ace", "lord_clean_gl0_ace"))

# metric id in results.json -> (label, how to read one method's value, lower is better)
METRICS = {
    "heldout_loss": ("held-out denoising loss", lambda m: m["heldout_loss"]["mean"], True),
    "subject_acc": ("subject accuracy", lambda m: m["subject_acc"]["mean"], False),
    "fd": ("FD (lab classifier, 128-d)", lambda m: m["fd"]["value"], True),
    "fd_pca": ("FD (lab classifier, 8 principal axes of the reference)", lambda m: m["fd_pca"]["value"], True),
    # the texture metrics (added with lab model 2; read wherever a run's score stage measured them)
    "target_corr": ("correlation of the samples with the ACE target", lambda m: m["target_corr"]["mean"], True),
    "hf_spectrum": ("HF spectrum distance to the reference", lambda m: m["hf_spectrum"]["value"], True),
}
PRIMARY = "heldout_loss"


def family_question(entry: str) -> tuple[str, str]:
    """``(metric, contrast)`` of one entry of a declared family: ``"removal_lord"`` asks it on the primary
    metric, ``"target_corr:A"`` on another metric of :data:`METRICS` (a co-primary question, e.g. lab model 2's
    "does the ACE target show in the samples?"). Every entry of a family is Holm-adjusted together."""
    metric, sep, contrast = entry.partition(":")
    if not sep:
        return PRIMARY, entry
    if metric not in METRICS:
        raise ValueError(f"family entry {entry!r}: unknown metric {metric!r} (known: {', '.join(METRICS)})")
    return metric, contrast


def family_of(result: dict, metric: str) -> set:
    """The contrasts that ``result``'s declared family asks on ``metric``."""
    return {c for m, c in map(family_question, result["family"]) if m == metric}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One attack setting of a dose-response experiment. Each replicate runs the plain LoRA on that
    attack's protected copies (the runner's method ``attacking``) in ``<out>/<experiment>/<name>/rNNN``;
    the analysis reads it back as method ``name`` and pairs it with the clean runs of ``Declared.paired_with``."""

    name: str
    attack: dict  # {"preset", "epsilon", "step_size", "rounds"}: lab.experiment.write_config's attack

    @property
    def contrast(self) -> Contrast:
        a = self.attack
        schedule = f"{a['rounds']} rounds" if a.get("rounds") is not None else "against the fixed model"
        return Contrast(f"A_{self.name}", ((self.name, 1), ("clean", -1)),
                        f"attack effect of {a['preset']} at {a['epsilon']:g} levels (step {a['step_size']:g}, "
                        f"{schedule}): plain LoRA on its protected copies minus plain LoRA on clean")


@dataclasses.dataclass(frozen=True)
class Declared:
    """One declared experiment (EVIDENCE.md): methods, attack, replicates, and the confirmatory family
    (contrasts of the primary metric, Holm-adjusted together).

    A dose-response experiment has ``arms`` (one attack setting each, its own folders) and reads every
    other method from the experiment ``paired_with`` (same replicates, seeds and subjects): a
    ``reference_arms`` setting as that experiment's ``attacking`` run, any other method under its own name.
    An experiment with ``paired_methods`` runs its other methods itself and reads only those from
    ``paired_with`` (e.g. the clean-image runs, which do not depend on the attack); its ``borrowed_stages``
    (Stage 1) are copied from ``paired_with``'s replicate before it runs, so both use the same adapter (the
    pipeline recomputes a copied stage whose key differs)."""

    name: str
    methods: tuple
    replicates: range
    attack: dict
    family: tuple
    purpose: str
    folder: str = ""  # the replicates' folder under --out (default: name); experiments sharing one share stages
    arms: tuple = ()
    paired_with: str = ""
    reference_arms: tuple = ()  # attack settings paired_with already ran (its 'attacking'), shown beside the arms
    paired_methods: tuple = ()  # with paired_with and no arms: only these are read from paired_with
    borrowed_stages: tuple = ()  # stage folders copied from paired_with's replicate (e.g. "stage1")
    # (alias, method): paired_with's method read under another name, e.g. the unaware attacker's runs beside
    # the aware one's (both called 'lord' in their own folders)
    aliases: tuple = ()
    # the Stage-1 copies' attack {"preset", "epsilon", "step_size"} (lab.experiment's stage1_data); None: PGD-2
    stage1_data: dict | None = None
    lab: str = "fashion"  # which lab model (lab.experiment.LABS): its data, subject, size, parts and classifier

    @property
    def home(self) -> str:
        return self.folder or self.name

    @property
    def own_methods(self) -> tuple:
        """The methods this experiment's own replicate runs train (the rest are read from ``paired_with``)."""
        if not self.paired_with:
            return self.methods
        aliased = {a for a, _ in self.aliases}
        return tuple(m for m in self.methods if self.paired_methods and m not in self.paired_methods
                     and m not in aliased)

    @property
    def contrasts(self) -> tuple:
        return CONTRASTS + tuple(arm.contrast for arm in self.arms + self.reference_arms)

    def source(self, out: Path, method: str, replicate: int) -> tuple[Path, str]:
        """Where ``method``'s value of ``replicate`` is: (the run's results.json, the method's name there)."""
        aliased = dict(self.aliases)
        if any(a.name == method for a in self.arms):
            folder, name = Path(out) / self.home / method, "attacking"
        elif method in aliased:
            folder, name = Path(out) / EXPERIMENTS[self.paired_with].home, aliased[method]
        elif self.paired_with and (not self.paired_methods or method in self.paired_methods):
            reference = any(a.name == method for a in self.reference_arms)
            folder, name = Path(out) / EXPERIMENTS[self.paired_with].home, "attacking" if reference else method
        else:
            folder, name = Path(out) / self.home, method
        return folder / f"r{int(replicate):03d}" / "run" / "report" / "results.json", name


DEFENSE_METHODS = ("clean", "attacking", "lord_clean", "lord", "onebranch_clean", "onebranch")
GATE_METHODS = ("lord_g10", "lord_clean_g10", "lord_g00", "lord_clean_g00")  # lord_g11: not run (compute)
EXPERIMENTS = {
    "pilot": Declared("pilot", DEFENSE_METHODS, range(0, 3), dict(ATTACK), (),
                      "exploration: sizes the confirmatory run, checks the protocol end to end"),
    "defense": Declared("defense", DEFENSE_METHODS, range(10, 18), dict(ATTACK),
                        ("A", "removal_lord", "lord_vs_plain_prot", "lord_vs_onebranch_prot"),
                        "confirmatory: does the attack damage a plain LoRA, and does LoRD remove that damage "
                        "beyond what a one-branch Stage-1 adapter does?"),
    # declared after 'defense' started and before any of its results were read: the same replicates
    # (folder 'defense': protect, Stage 1 and the six defense runs are shared), six more Stage-2 runs
    "gates": Declared("gates", DEFENSE_METHODS + GATE_METHODS, range(10, 18), dict(ATTACK),
                      ("removal_g10", "g10_vs_plain_prot", "lord_vs_g00_prot"),
                      "confirmatory: does B' absorb the attack when it is on during Stage-2 training and off at "
                      "sampling, and does the gate matter at all?", folder="defense"),
}


def _aspl(levels: float) -> dict:
    # the 'defense' attack's schedule (10 rounds, step = budget / 16) at another budget
    return {"preset": "anti_dreambooth_aspl", "epsilon": float(levels), "step_size": levels / 16, "rounds": 10}


# declared after 'defense' and 'gates' were reported (EVIDENCE.md, "threat"); arms in the order they run
THREAT_ARMS = (
    Arm("aspl_4", _aspl(4)),
    Arm("mist_v2_4", {"preset": "mist_v2", "epsilon": 4.0, "step_size": 0.6375, "rounds": 5}),  # published
    Arm("aspl_8", _aspl(8)),
    Arm("aspl_16", _aspl(16)),
    Arm("mist_v2_32", {"preset": "mist_v2", "epsilon": 32.0, "step_size": 2.0, "rounds": 5}),
)
EXPERIMENTS["threat"] = Declared(
    "threat", ("clean", "aspl_32") + tuple(a.name for a in THREAT_ARMS), range(10, 18), dict(ATTACK),
    tuple(a.contrast.name for a in THREAT_ARMS),
    "confirmatory: the threat's dose-response -- does each attack setting damage a plain LoRA of the held-out "
    "subject (ASPL at 4, 8, 16 levels; mist-v2 at its published 4 levels and at 32)? ASPL at 32 levels is the "
    "'defense' experiment's A, shown for reference", arms=THREAT_ARMS, paired_with="defense",
    reference_arms=(Arm("aspl_32", dict(ATTACK)),))
# declared after 'threat' was reported (EVIDENCE.md, "mist"): the defense questions at the strongest threat
# measured, mist-v2 at 32 levels. Its own runs add the LoRD, one-branch, oracle-gate and Gaussian-noise
# methods to the threat arm's replicate folders (protect and the plain LoRA on protected copies are cached
# there); the clean-image runs and Stage 1 (LoRD and one-branch adapters) are the 'defense' replicates'.
MIST_32 = THREAT_ARMS[-1]
EXPERIMENTS["mist"] = Declared(
    "mist", ("clean", "attacking", "lord_clean", "lord", "onebranch_clean", "onebranch", "lord_clean_g10",
             "lord_g10", "noise"), range(10, 18), dict(MIST_32.attack),
    ("removal_lord", "lord_vs_plain_prot", "lord_vs_onebranch_prot", "removal_g10", "noise_vs_plain_prot"),
    "confirmatory: at mist-v2 with 32 levels (the strongest threat measured), does LoRD remove part of the "
    "damage, beyond the one-branch control; does B' on in training / off at sampling; does Gaussian-noise "
    "purification?", folder=f"threat/{MIST_32.name}", paired_with="defense",
    paired_methods=("clean", "lord_clean", "onebranch_clean", "lord_clean_g10"),
    borrowed_stages=("stage1", "stage1_onebranch"))
# exploration (replicates 3-4, never confirmatory): does Stage 1 on copies matched to the threat -- ACE, mist-v2's
# objective, at the threat's 32 levels against the fixed model -- train a gate that separates clean from
# protected images (the "mist" Detect gate stayed at 0.503 after PGD-2 copies)? Sizes "matched" (EVIDENCE.md).
STAGE1_ACE_32 = {"preset": "ace_fixed", "epsilon": 32.0, "step_size": 2.0}
EXPERIMENTS["matched_pilot"] = Declared(
    "matched_pilot", ("clean", "attacking", "lord_clean", "lord", "onebranch"), range(3, 5), dict(MIST_32.attack),
    (), "exploration: Stage 1 on ACE-32 copies (matched to mist-v2-32) -- does its gate separate, and how large "
    "are the defense contrasts?", stage1_data=STAGE1_ACE_32)
# declared after the pilot above (EVIDENCE.md, "matched"): issue 20's matched Stage-1 data at the strongest threat.
# Every stage is its own (folder 'matched'): protect (the same mist-v2-32 copies as 'threat', same seeds),
# Stage 1 and the one-branch control on ACE-32 copies, and the six defense runs.
EXPERIMENTS["matched"] = Declared(
    "matched", DEFENSE_METHODS, range(10, 18), dict(MIST_32.attack),
    ("removal_lord", "lord_vs_onebranch_prot", "lord_vs_plain_prot"),
    "confirmatory: with Stage 1 trained on copies matched to the threat (ACE at 32 levels, mist-v2's objective "
    "against the fixed model) instead of PGD-2, does LoRD remove part of mist-v2-32's damage, beyond the one-branch "
    "control trained on the same copies?", stage1_data=STAGE1_ACE_32)
# lab model 2 (64 px textures, subject "wood"; lab/MODEL_CARD_2.md): exploration replicates 0-2 at mist-v2's
# published 4 levels, to check the protocol on it end to end and size its threat dose-response (issue 21).
MIST_4 = THREAT_ARMS[1]
EXPERIMENTS["pilot_textures"] = Declared(
    "pilot_textures", ("clean", "attacking", "lord_clean", "lord"), range(0, 3), dict(MIST_4.attack), (),
    "exploration on lab model 2: the protocol end to end at 64 px, mist-v2 at its published 4 levels",
    lab="textures")
# declared after that pilot (EVIDENCE.md, "textures"): issue 21's first question on lab model 2 -- does mist-v2 at its
# published budget damage a plain LoRA of the held-out subject, in the held-out loss and in the attack's own
# success signal (the ACE target's correlation with the samples), and does Gaussian-noise purification (the one
# baseline that needs no Stage 1) undo it? Replicates 10-19 of lab/texture_data.
EXPERIMENTS["textures"] = Declared(
    "textures", ("clean", "attacking", "noise"), range(10, 20), dict(MIST_4.attack),
    ("A", "target_corr:A", "noise_vs_plain_prot", "target_corr:noise_vs_plain_prot"),
    "confirmatory on lab model 2 (64 px textures, subject 'wood'): does mist-v2 at its published budget (4 levels) "
    "damage a plain LoRA of the held-out subject -- its held-out denoising loss, and does the ACE target show in "
    "its samples? Does Gaussian-noise purification of the protected copies help?", lab="textures")
# exploration on lab model 2 (pilot_textures' replicates 0-2, never confirmatory): the defense comparison's pilot.
# The PGD-2 Stage-1 gate stayed at 0.500 on lab 2 as on lab 1, so Stage 1 (LoRD and the one-branch control)
# trains on copies matched to the threat: ACE, mist-v2's objective, at the threat's 4 levels and step against the
# fixed model. Then LoRD (B' live, and B' off at sampling), the one-branch control and the purification baselines
# on pilot_textures' protected copies (borrowed: the same mist-v2-4 copies, same seeds); the plain runs on clean
# and protected images are read from pilot_textures. Sizes the declared lab-2 defense comparison.
STAGE1_ACE_4 = {"preset": "ace_fixed", "epsilon": 4.0, "step_size": MIST_4.attack["step_size"]}
TEXTURE_DEFENSES = ("lord_clean", "lord", "lord_clean_gl0", "lord_gl0", "onebranch_clean", "onebranch", "noise",
                    "jpeg", "diffpure", "pgd2_defense")  # pgd2_defense: added 2026-12-03 before any run finished
EXPERIMENTS["pilot_textures_defense"] = Declared(
    "pilot_textures_defense", ("clean", "attacking") + TEXTURE_DEFENSES, range(0, 3), dict(MIST_4.attack), (),
    "exploration on lab model 2: Stage 1 on ACE-4 copies (matched to mist-v2-4) -- does its gate separate, and how "
    "large are LoRD's, the one-branch control's and the purifiers' contrasts against mist-v2 at its published "
    "budget?", paired_with="pilot_textures", paired_methods=("clean", "attacking"), borrowed_stages=("protect",),
    stage1_data=STAGE1_ACE_4, lab="textures")
# declared before any of its runs and before any Stage-2 result of the pilot above (EVIDENCE.md, "textures_defense"):
# issue 21's defense comparison on "textures"' replicates 10-19, where mist-v2 at its published 4 levels damages a
# plain LoRA. Own runs: Stage 1 (LoRD and the one-branch control) on ACE-4 copies, the LoRD runs (B' live, and B'
# off at sampling), the one-branch control, JPEG, DiffPure-style and the Stage-2 PGD-2 defense on the replicates'
# protected copies (the protect stage is borrowed from "textures": the same mist-v2-4 copies, same seeds); the plain
# runs on clean and protected images and the Gaussian-noise run are read from "textures".
TEXTURE_DEFENSE_FAMILY = ("removal_lord", "removal_gl0", "gl0_vs_onebranch_prot", "pgd2_vs_plain_prot",
                          "jpeg_vs_plain_prot", "diffpure_vs_plain_prot", "target_corr:removal_lord",
                          "target_corr:removal_gl0")
EXPERIMENTS["textures_defense"] = Declared(
    "textures_defense", ("clean", "attacking", "noise") + tuple(m for m in TEXTURE_DEFENSES if m != "noise"),
    range(10, 20), dict(MIST_4.attack), TEXTURE_DEFENSE_FAMILY,
    "confirmatory on lab model 2: against mist-v2 at its published budget (4 levels), how much of the damage to a "
    "plain LoRA do LoRD (Stage 1 on ACE-4 copies; B' live, and B' off at sampling), the one-branch control, the "
    "Stage-2 PGD-2 defense, JPEG and DiffPure-style purification remove -- in the held-out loss and in the ACE "
    "target's correlation with the samples?", paired_with="textures", paired_methods=("clean", "attacking", "noise"),
    borrowed_stages=("protect",), stage1_data=STAGE1_ACE_4, lab="textures")
# declared on 2026-12-04 before any of its runs and before any result of "textures_defense" was read (EVIDENCE.md,
# "textures_share"): the paper's Fig. 7 on lab model 2. Folder 'textures_defense' (its protect, Stage 1 and LoRD
# runs on 0 and 8 of 8 protected images are reused); own: plain and LoRD Stage-2 runs on 2, 4 and 6 of 8 protected
# images, the LoRD ones also sampled with B' off; the plain runs on 0 and 8 of 8 are read from "textures".
TEXTURE_SHARE_METHODS = tuple(f"{kind}_mix{k}" for k in (2, 4, 6) for kind in ("plain", "lord", "lord_gl0"))
EXPERIMENTS["textures_share"] = Declared(
    "textures_share", EXPERIMENTS["textures_defense"].methods + TEXTURE_SHARE_METHODS, range(10, 20),
    dict(MIST_4.attack), ("slope_plain", "slope_lord_vs_plain", "slope_gl0_vs_plain", "target_corr:slope_plain"),
    "confirmatory on lab model 2: the paper's Fig. 7 -- as more of the 8 subject images are protected (mist-v2 at 4 "
    "levels), does a plain LoRA get worse, and does LoRD (Stage 1 on ACE-4 copies; B' live, and B' off at sampling) "
    "flatten that curve?", folder="textures_defense", paired_with="textures",
    paired_methods=("clean", "attacking", "noise"), borrowed_stages=("protect",), stage1_data=STAGE1_ACE_4,
    lab="textures")


def _ace_fixed(levels: float) -> dict:
    # mist-v2's ACE against the fixed model (150 steps); the published step (0.6375 levels) up to 8 levels,
    # budget / 16 above (as "threat"'s mist_v2_32), so that 150 steps can reach the budget
    step = max(float(MIST_4.attack["step_size"]), levels / 16)
    return {"preset": "ace_fixed", "epsilon": float(levels), "step_size": step}


def _mist(levels: float) -> dict:
    return {**_ace_fixed(levels), "preset": "mist_v2", "rounds": MIST_4.attack["rounds"]}


# declared on 2026-12-04 before any of its runs (EVIDENCE.md, "textures_threat"): issue 21's threat dose-response on
# lab model 2 -- ACE against the fixed model, the mist-v2 preset (ACE with its surrogate loop) and ASPL at 4, 8, 16
# and 32 levels on "textures"' replicates (mist-v2 at 4 levels is "textures"' own 'attacking', the reference arm).
# Arms in the order they run: cheapest first within each budget, the published budget's first.
TEXTURE_THREAT_ARMS = tuple(Arm(f"{name}_{levels}", make(levels)) for levels in (4, 8, 16, 32)
                            for name, make in (("ace", _ace_fixed), ("aspl", _aspl), ("mist_v2", _mist))
                            if (name, levels) != ("mist_v2", 4))
EXPERIMENTS["textures_threat"] = Declared(
    "textures_threat", ("clean", "mist_v2_4") + tuple(a.name for a in TEXTURE_THREAT_ARMS), range(10, 20),
    dict(MIST_4.attack), tuple(a.contrast.name for a in TEXTURE_THREAT_ARMS),
    "confirmatory on lab model 2: the threat's dose-response -- does each attack (ACE against the fixed model, "
    "the mist-v2 preset, ASPL) at each budget (4, 8, 16, 32 levels) damage a plain LoRA of the held-out subject? "
    "mist-v2 at 4 levels is \"textures\"' A, shown for reference", arms=TEXTURE_THREAT_ARMS, paired_with="textures",
    reference_arms=(Arm("mist_v2_4", dict(MIST_4.attack)),), lab="textures")
# the B'-strength sweep at sampling (issue 20, experiment 3): the 'matched' LoRD's Stage-2 LoRAs sampled with B'
# scaled by 0 (lord_gl0), 0.5, 1 (lord) and 2, on protected and on clean images. Sampling-time only: the
# replicates' protect, Stage 1 and Stage-2 training are the 'matched' (or 'matched_pilot') folder's, reused.
STRENGTH_METHODS = ("lord_gl0", "lord_clean_gl0", "lord_b05", "lord_clean_b05", "lord_b2", "lord_clean_b2")
EXPERIMENTS["strength_pilot"] = Declared(
    "strength_pilot", ("clean", "attacking", "lord_clean", "lord") + STRENGTH_METHODS, range(3, 4),
    dict(MIST_32.attack), (), "exploration: the B'-strength sweep on the matched pilot's replicate (sizes 'strength')",
    folder="matched_pilot", stage1_data=STAGE1_ACE_32)
# declared after the pilot above (EVIDENCE.md, "strength"): the sweep on the 'matched' replicates (folder 'matched':
# their protect, Stage 1, one-branch control and Stage-2 LoRAs are reused; only sampling and scoring run)
EXPERIMENTS["strength"] = Declared(
    "strength", DEFENSE_METHODS + STRENGTH_METHODS, range(10, 18), dict(MIST_32.attack),
    ("gl0_vs_lord_prot", "removal_gl0", "gl0_vs_onebranch_prot", "b2_vs_lord_prot"),
    "confirmatory: with the 'matched' LoRD (Stage 1 on ACE-32 copies) against mist-v2-32, how does B''s strength "
    "at sampling (0, 0.5, 1, 2) change the held-out loss; does switching B' off at sampling remove more of the "
    "damage, and beat the one-branch control?", folder="matched", stage1_data=STAGE1_ACE_32)
# declared before any of its runs (EVIDENCE.md, "share"): the paper's Fig. 7 on the 'matched' replicates (folder
# 'matched': protect, Stage 1 and the 0- and 8-of-8 runs are reused; six Stage-2 runs per replicate are new)
SHARE_METHODS = ("plain_mix2", "lord_mix2", "plain_mix4", "lord_mix4", "plain_mix6", "lord_mix6")
EXPERIMENTS["share"] = Declared(
    "share", DEFENSE_METHODS + SHARE_METHODS, range(10, 18), dict(MIST_32.attack),
    ("slope_plain", "slope_lord_vs_plain", "lord_vs_plain_mix4"),
    "confirmatory: the paper's Fig. 7 -- as more of the 8 subject images are protected (mist-v2-32), does a plain "
    "LoRA get worse, and does LoRD (Stage 1 on ACE-32 copies) flatten that curve?", folder="matched",
    stage1_data=STAGE1_ACE_32)
# the adaptive attacker (issue 20, experiment 4): mist-v2-32 computed against the model with the replicate's
# 'matched' LoRD live (its surrogate LoRA fine-tunes on the defended model). Stage 1 (both adapters) is borrowed
# from the paired experiment's replicate; the clean-image runs are read from it (they do not see the attack).
ADAPTIVE_ATTACK = {**MIST_32.attack, "defense_aware": True}
ADAPTIVE_OWN = ("attacking", "lord", "lord_gl0", "onebranch")
EXPERIMENTS["adaptive_pilot"] = Declared(
    "adaptive_pilot", ("clean", "lord_clean", "lord_clean_gl0") + ADAPTIVE_OWN, range(3, 4), ADAPTIVE_ATTACK, (),
    "exploration: the defense-aware mist-v2-32 on the matched pilot's replicate (sizes 'adaptive')",
    paired_with="matched_pilot", paired_methods=("clean", "lord_clean", "lord_clean_gl0"),
    borrowed_stages=("stage1", "stage1_onebranch"), stage1_data=STAGE1_ACE_32)
# declared after the pilot above (EVIDENCE.md, "adaptive"): the 'matched' replicates attacked by the defense-aware
# mist-v2-32 (folder 'adaptive'); clean-image runs and the unaware attacker's runs are read from 'matched'
EXPERIMENTS["adaptive"] = Declared(
    "adaptive", ("clean", "lord_clean", "lord_clean_gl0", "onebranch_clean") + ADAPTIVE_OWN
    + ("attacking_unaware", "lord_unaware", "lord_gl0_unaware"), range(10, 18), ADAPTIVE_ATTACK,
    ("removal_lord", "removal_gl0", "survival_gl0"),
    "confirmatory: against an attacker who computes mist-v2-32 with the replicate's LoRD live (its surrogate "
    "fine-tunes on the defended model), does LoRD (B' live, and B' off at sampling) still remove damage, and how "
    "much of what it removed against the unaware attacker survives?",
    paired_with="matched", paired_methods=("clean", "lord_clean", "lord_clean_gl0", "onebranch_clean"),
    borrowed_stages=("stage1", "stage1_onebranch"), stage1_data=STAGE1_ACE_32,
    aliases=(("attacking_unaware", "attacking"), ("lord_unaware", "lord"), ("lord_gl0_unaware", "lord_gl0")))
# issue 20's experiment 3, the rest: Stage 1 on copies from another attack than the threat's. The defender does
# not know which attack protected the images; does a LoRD whose Stage 1 saw ASPL-32 copies (Anti-DreamBooth's
# loop, the 'defense' threat's schedule) or a mix (even images ASPL-32, odd ACE-32) still defend against
# mist-v2-32, and as well as the matched (ACE-32) one? Declared before any run (EVIDENCE.md, "source"); each
# source has its folder; protect (the mist-v2-32 copies) is borrowed from 'matched', and the clean and plain runs
# and the matched LoRD's runs (aliases *_ace) are read from it. Own: Stage 1 on the new copies, 2 Stage-2 runs,
# 4 samplings.
SOURCE_METHODS = ("lord_clean", "lord", "lord_clean_gl0", "lord_gl0")
SOURCE_ALIASES = (("lord_ace", "lord"), ("lord_clean_ace", "lord_clean"), ("lord_gl0_ace", "lord_gl0"),
                  ("lord_clean_gl0_ace", "lord_clean_gl0"))
STAGE1_SOURCES = {
    "aspl": {"preset": "aspl", "epsilon": 32.0, "step_size": 2.0, "rounds": 10},
    "mixed": {"preset": "aspl_ace", "epsilon": 32.0, "step_size": 2.0, "rounds": 10},
}
for _source, _data in STAGE1_SOURCES.items():
    EXPERIMENTS[f"source_{_source}"] = Declared(
        f"source_{_source}", ("clean", "attacking") + SOURCE_METHODS + tuple(a for a, _ in SOURCE_ALIASES),
        range(10, 18), dict(MIST_32.attack), ("removal_lord", "removal_gl0", "removal_gl0_vs_ace"),
        f"confirmatory: with Stage 1 on {'ASPL-32' if _source == 'aspl' else 'ASPL-32 + ACE-32 (even / odd images)'} "
        "copies instead of the threat's own attack, does LoRD (B' live, and B' off at sampling) remove part of "
        "mist-v2-32's damage, and does it remove less than the matched (ACE-32) Stage 1?",
        paired_with="matched", paired_methods=("clean", "attacking"), borrowed_stages=("protect",),
        stage1_data=_data, aliases=SOURCE_ALIASES)
# the gate-evasion attacker (issue 20, experiment 4, beyond 'adaptive'): the defense-aware mist-v2-32 that also
# pushes the LoRD's gate down on every PGD step ([attack] gate_evasion = weight). Exploration first: on the
# matched pilot's replicate 3, how far does each weight bring the Detect gate on the copies down (run with
# --only detect: protect + Detect, Stage 1 borrowed)? Sizes the weight of a confirmatory 'evasion'.
EVASION_WEIGHTS = (1.0, 3.0, 10.0, 100.0)  # 3: added after 1, 10, 100 ran (between the two regimes)
for _w in EVASION_WEIGHTS:
    EXPERIMENTS[f"evasion_pilot_w{_w:g}"] = Declared(
        f"evasion_pilot_w{_w:g}", ("clean", "lord_clean", "lord_clean_gl0") + ADAPTIVE_OWN, range(3, 4),
        {**ADAPTIVE_ATTACK, "gate_evasion": _w},
        (), f"exploration: the gate-evasion attacker (weight {_w:g}) on the matched pilot's replicate (sizes 'evasion')",
        paired_with="matched_pilot", paired_methods=("clean", "lord_clean", "lord_clean_gl0"),
        borrowed_stages=("stage1", "stage1_onebranch"), stage1_data=STAGE1_ACE_32)
# declared after the exploration above (EVIDENCE.md, "evasion"): the 'matched' replicates attacked by the
# defense-aware mist-v2-32 with the gate-evasion term at weight 3 (the smallest explored weight that shut the gate);
# laid out like 'adaptive' (clean-image runs and the unaware attacker's runs read from 'matched')
EVASION_WEIGHT = 3.0
EXPERIMENTS["evasion"] = Declared(
    "evasion", EXPERIMENTS["adaptive"].methods, range(10, 18), {**ADAPTIVE_ATTACK, "gate_evasion": EVASION_WEIGHT},
    ("removal_gl0", "removal_lord", "gl0_vs_unaware_prot"),
    "confirmatory: against an attacker who computes mist-v2-32 through the replicate's LoRD and also pushes its "
    "gate down (weight 3), does LoRD (B' off at sampling, and B' live) still remove damage, and is the defended "
    "user (B' off) worse off than against the unaware attacker?",
    paired_with="matched", paired_methods=("clean", "lord_clean", "lord_clean_gl0", "onebranch_clean"),
    borrowed_stages=("stage1", "stage1_onebranch"), stage1_data=STAGE1_ACE_32, aliases=EXPERIMENTS["adaptive"].aliases)
HELDOUT_IMAGES = {"ci": 8, "demo": 32}  # the first N bags of lab/demo_data/reference
HELDOUT_DRAWS = {"ci": 1, "demo": 4}


def replicate_dir(out: Path, experiment: str, replicate: int) -> Path:
    return Path(out) / experiment / f"r{int(replicate):03d}"


def heldout_folder(out: Path, scale: str, lab: str = "fashion") -> Path:
    """A copy of the first images of the lab model's ``reference/`` (lab 1: ``lab/demo_data/reference``, bags):
    the held-out subject images (never trained on)."""
    folder = Path(out) / (f"heldout_{scale}" if lab == "fashion" else f"heldout_{lab}_{scale}")
    names = sorted((LABS[lab].data / "reference").glob("*.png"))[:HELDOUT_IMAGES[scale]]
    if sorted(p.name for p in folder.glob("*.png")) != [p.name for p in names]:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for p in names:
            shutil.copy(p, folder / p.name)
    return folder


def write_replicate_config(out: Path, declared: Declared, replicate: int, scale: str, checkpoint: Path,
                           classifier: Path, arm: Arm | None = None) -> Path:
    """``exp.toml`` of one replicate (of one ``arm`` of a dose-response experiment: the plain LoRA on that
    attack's copies, method ``attacking``, in ``<out>/<experiment>/<arm>/rNNN``)."""
    from lab.experiment import write_config

    lab = LABS[declared.lab]
    subject = lab.replicate_folder(replicate)
    if not subject.is_dir():
        raise SystemExit(f"no subject images for replicate {replicate}: {subject} is missing "
                         f"(python -m {lab.exporter} exports them)")
    folder = run_folder(declared, arm)
    return write_config(replicate_dir(out, folder, replicate), checkpoint, classifier, scale, lab=lab,
                        seed=replicate_seed(replicate), instance=subject,
                        attack=declared.attack if arm is None else arm.attack,
                        methods=folder_methods(folder), heldout=heldout_folder(out, scale, declared.lab),
                        overrides={"heldout_draws": HELDOUT_DRAWS[scale],
                                   **({"stage1_data": declared.stage1_data} if declared.stage1_data else {})})


def run_folder(declared: Declared, arm: Arm | None = None) -> str:
    """The folder (under ``--out``) of ``declared``'s replicate runs, or of one of its arms."""
    return declared.home if arm is None else f"{declared.home}/{arm.name}"


def folder_methods(folder: str) -> tuple:
    """Every method that any declared experiment runs in ``folder``, in declaration order: experiments that
    share a folder (defense and gates; a threat arm and mist) share its stages, and the run's results.json
    lists the methods of its config, so each one's config must name them all -- otherwise running one
    experiment again would drop the other's methods from the results its analysis reads."""
    methods: list = []
    for declared in EXPERIMENTS.values():
        if declared.arms:
            own = ("attacking",) if any(run_folder(declared, a) == folder for a in declared.arms) else ()
        else:
            own = declared.own_methods if declared.home == folder else ()
        methods += [m for m in own if m not in methods]
    return tuple(methods)


def borrow_stages(out: Path, declared: Declared, replicate: int) -> list[str]:
    """Copy ``declared.borrowed_stages`` of ``replicate`` from the ``paired_with`` run into this experiment's
    run (only where this run has no such stage folder yet); returns the names copied. A copied stage is
    reused only if its key matches this run's (``training.pipeline``), else it is recomputed."""
    copied = []
    if not declared.borrowed_stages:
        return copied
    source = replicate_dir(out, EXPERIMENTS[declared.paired_with].home, replicate) / "run" / "stages"
    target = replicate_dir(out, declared.home, replicate) / "run" / "stages"
    for name in declared.borrowed_stages:
        if (source / name / "stage.json").is_file() and not (target / name).exists():
            target.mkdir(parents=True, exist_ok=True)
            partial = target / f".{name}.copying"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source / name, partial, ignore=shutil.ignore_patterns(*carry.NEVER, *carry.UNLESS_STARTED))
            partial.rename(target / name)
            copied.append(name)
    return copied


def archived(results: Path, out: Path, archive: Path | None = None) -> Path:
    """Where the archive keeps a replicate's ``results.json`` (``<out>/<folder>/rNNN/run/report/results.json``
    -> ``<archive>/<folder>/rNNN.json``)."""
    rel = Path(results).relative_to(out)  # <folder...>/rNNN/run/report/results.json
    return Path(archive or ARCHIVE) / rel.parent.parent.parent.parent / f"{rel.parts[-4]}.json"


def kept_results(results: Path, out: Path, archive: Path | None = None) -> Path:
    """``results`` if the output folder still has it, else its archived copy (which may not exist either)."""
    return results if Path(results).is_file() else archived(results, out, archive)


def archive_results(results: Path, out: Path, archive: Path | None = None) -> Path:
    """Copy one finished replicate's ``results.json`` into the archive (atomically); returns its path."""
    from lord_ops.atomic import atomic_write

    target = archived(results, out, archive)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = Path(results).read_bytes()
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return target


def _numbers(tree, prefix: str = "") -> dict:
    """The numeric leaves of a JSON tree, by their dotted path (lists by index)."""
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return {}
    if isinstance(tree, (int, float)):
        return {prefix: float(tree)}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    found = {}
    for key, value in items:
        found.update(_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def reproduction(before: dict, after: dict) -> dict[str, float]:
    """For each method two ``results.json`` trees both list: the largest absolute difference between their
    metrics and training record (every numeric leaf under ``methods.<m>.metrics`` and ``.train``, the final
    training loss included; ``inf`` when one has a number the other lacks).
    0.0 everywhere means the rerun reproduced the earlier run exactly."""
    old, new = before.get("methods") or {}, after.get("methods") or {}
    out = {}
    for method in sorted(set(old) & set(new)):
        a, b = ({part: m[method].get(part) for part in ("metrics", "train")} for m in (old, new))
        a, b = _numbers(a), _numbers(b)
        if set(a) != set(b):
            out[method] = float("inf")
            continue
        out[method] = max((abs(a[k] - b[k]) for k in a), default=0.0)
    return out


def check_reproduction(results: Path, out: Path, archive: Path | None = None) -> dict[str, float] | None:
    """Before a finished replicate's ``results.json`` replaces its archived copy (a replicate rerun because an
    experiment sharing its folder added methods): compare the methods both have and print whether the rerun
    reproduced them (a free determinism check). ``None`` when nothing was archived before."""
    target = archived(results, out, archive)
    try:
        before = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    differences = reproduction(before, json.loads(Path(results).read_text(encoding="utf-8")))
    if not differences:
        return differences
    differ = {m: d for m, d in differences.items() if d}
    if differ:
        print(f"[evidence] NOT reproduced: {target} (archived before) and the rerun differ in {len(differ)} of "
              f"{len(differences)} shared method(s): "
              + ", ".join(f"{m} (largest difference {d:.3g})" for m, d in differ.items())
              + f"; the earlier file stays in git history (git log -- {target})", flush=True)
    else:
        print(f"[evidence] reproduced: the rerun's {len(differences)} method(s) shared with {target} have identical "
              f"metrics", flush=True)
    return differences


def parse_replicates(text: str | None, default: range) -> list[int]:
    """``"10-17"`` or ``"10,12"`` -> replicate indices (default: the experiment's declared range)."""
    if not text:
        return list(default)
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--replicates {text!r}: {part!r} is not a number or a range like 10-17") from None
        if last < first:
            raise ValueError(f"--replicates {text!r}: the range {part!r} is empty (write it low-high)")
        out += list(range(first, last + 1))
    return out


def parse_worker(text: str | None) -> tuple[int, int]:
    """``"k/K"`` -> ``(k, K)``: this process runs the replicates ``r`` with ``r % K == k``, so workers are
    numbered ``0 .. K-1`` (``0/2`` and ``1/2`` share the work; ``2/2`` would select nothing and is refused)."""
    if not text:
        return 0, 1
    k, sep, workers = text.partition("/")
    try:
        k, workers = int(k), int(workers)
    except ValueError:
        raise ValueError(f"--worker {text!r}: write k/K, e.g. 0/2 and 1/2 for two processes") from None
    if not sep or workers < 1:
        raise ValueError(f"--worker {text!r}: write k/K with K >= 1 processes, e.g. 0/2 and 1/2")
    if not 0 <= k < workers:
        raise ValueError(f"--worker {text!r}: workers are numbered 0 to K-1 (r % K == k), e.g. "
                         f"{' and '.join(f'{i}/{workers}' for i in range(workers))}")
    return k, workers


def label_of(declared: Declared, arm: Arm | None = None) -> str:
    return declared.name + (f" arm {arm.name}" if arm else "")


def _listed_methods(results: Path) -> set | None:
    try:
        return set(json.loads(Path(results).read_text(encoding="utf-8")).get("methods") or {})
    except (OSError, ValueError):
        return None


def methods_missing(results: Path, declared: Declared, arm: Arm | None = None) -> list[str]:
    """The methods ``declared`` runs itself (one arm: ``attacking``) that a replicate's ``results`` lacks: it shares
    its folder with an experiment whose replicate ran before it was declared, so that archived copy does not
    answer it."""
    listed = _listed_methods(results)
    own = ("attacking",) if arm is not None else declared.own_methods
    return [] if listed is None else [m for m in own if m not in listed]


def methods_dropped(results: Path, folder: str) -> list[str]:
    """The methods a replicate's existing ``results`` (results.json, in the output folder or the archive) lists
    that this code's config for ``folder`` would not name (:func:`folder_methods`): an experiment declared in a
    newer commit shares the folder, so a run from this (older) code would rewrite the report without them."""
    listed = _listed_methods(results) or set()
    runs = set(folder_methods(folder))
    return sorted(m for m in listed if m not in runs)


def prepare_replicate(out: Path, declared: Declared, replicate: int, scale: str, checkpoint: Path, classifier: Path,
                      arm: Arm | None = None, carried: Path | None = None) -> Path:
    """Before a replicate runs: write its ``exp.toml``, restore its stages carried in the repository (demo scale:
    :mod:`lab.carry`, from ``carried`` or the default folder) and borrow its paired run's stages; returns the
    config's path."""
    config = write_replicate_config(out, declared, replicate, scale, checkpoint, classifier, arm)
    if scale == "demo":
        restored = carry.restore(out, run_folder(declared, arm), carried or carry.CARRY, f"r{replicate:03d}")
        if restored.copied:
            print(f"[evidence] {label_of(declared, arm)} replicate {replicate}: {len(restored.copied)} stage(s) "
                  f"restored from {carried or carry.CARRY}", flush=True)
    borrow_stages(out, declared, replicate)
    return config


def run(args) -> int:
    from lab.ship import ensure_checkpoint
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable
    from training.experiment.cli import main as run_experiment

    declared = EXPERIMENTS[args.experiment]
    try:
        replicates = parse_replicates(args.replicates, declared.replicates)
        k, workers = parse_worker(args.worker)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    mine = [r for r in replicates if r % workers == k]
    if not mine:
        print(f"[evidence] {args.experiment}: worker {k}/{workers} has none of replicates {replicates}: "
              f"nothing to run", flush=True)
        return 0
    ensure_comfyui_importable(cpu=True if args.cpu else None)
    out = Path(args.out)
    lab = LABS[declared.lab]
    parts = Path(args.parts) if args.parts else lab.parts
    classifier = Path(args.classifier) if args.classifier else lab.classifier
    for path, what in ((parts, "parts"), (classifier, "classifier")):
        if not path.is_file():
            raise SystemExit(f"lab model {lab.name!r}: its {what} file {path} is missing ({lab.retrain} trains it; "
                             f"--{what} takes another)")
    checkpoint = ensure_checkpoint(out / "checkpoint" / lab.checkpoint_name, parts)
    failed = []
    jobs = [(arm, r) for arm in declared.arms for r in mine] if declared.arms else [(None, r) for r in mine]
    for arm, r in jobs:  # a dose-response runs arm by arm, so that whole arms finish first
        t0 = time.time()
        job = r if arm is None else f"{arm.name}/{r}"
        if arm is not None:
            paired, _ = declared.source(out, "clean", r)
            if not paired.is_file():
                print(f"[evidence] note: {paired} is missing: the arm's contrasts need the '{declared.paired_with}' "
                      f"run of replicate {r} (python -m lab.evidence run {declared.paired_with} --replicates {r})",
                      flush=True)
        results = replicate_dir(out, run_folder(declared, arm), r) / "run" / "report" / "results.json"
        kept = archived(results, out, args.archive)
        if args.scale == "demo" and kept.is_file() and not results.is_file() and not args.rerun_archived:
            missing = methods_missing(kept, declared, arm)
            if not missing:
                print(f"[evidence] {label_of(declared, arm)} replicate {r}: archived in {kept}, skipped "
                      f"(--rerun-archived runs it again)", flush=True)
                continue
            print(f"[evidence] {label_of(declared, arm)} replicate {r}: archived in {kept} without "
                  f"{', '.join(missing)} (an experiment sharing its folder): running it (stages missing from "
                  f"{out} are recomputed)", flush=True)
        dropped = methods_dropped(kept_results(results, out, args.archive), run_folder(declared, arm))
        if dropped:
            print(f"[evidence] {label_of(declared, arm)} replicate {r}: its results.json has method(s) "
                  f"{', '.join(dropped)} that no experiment declared in this code runs in its folder: running it "
                  f"would write a report without them. Run it from a commit that declares them; skipped",
                  file=sys.stderr, flush=True)
            failed.append(job)
            continue
        config = prepare_replicate(out, declared, r, args.scale, checkpoint, classifier, arm, args.carry)
        label = label_of(declared, arm)
        print(f"[evidence] {label} replicate {r} (seed {replicate_seed(r)}) -> {config.parent}", flush=True)
        code = run_experiment(["--config", str(config)] + (["--cpu"] if args.cpu else [])
                              + (["--only", args.only] if getattr(args, "only", None) else []))
        print(f"[evidence] replicate {r}: exit {code} in {time.time() - t0:.0f} s", flush=True)
        if not code and args.scale == "demo" and results.is_file():
            check_reproduction(results, out, args.archive)
            print(f"[evidence] archived: {archive_results(results, out, args.archive)}", flush=True)
        if code:
            failed.append(job)
    if failed:
        print(f"[evidence] replicates {failed} failed (finished stages are kept; run the same command)", file=sys.stderr)
    return 1 if failed else 0


def replicate_values(out: Path, declared: Declared, archive: Path | None = None) -> dict:
    """``{metric: {method: {replicate: value}}}`` of every finished replicate run (its report written),
    each method read where ``declared.source`` says: from the output folder, else from the archive."""
    values: dict = {m: {meth: {} for meth in declared.methods} for m in METRICS}
    cache: dict = {}
    for r in declared.replicates:
        for meth in declared.methods:
            results, name = declared.source(out, meth, r)
            if results not in cache:
                found = kept_results(results, out, archive)
                cache[results] = json.loads(found.read_text(encoding="utf-8"))["methods"] if found.is_file() else {}
            for metric, (_, read, _) in METRICS.items():
                try:
                    values[metric][meth][r] = float(read(cache[results][name]["metrics"]))
                except (KeyError, TypeError):
                    pass
    return values


GATE_QUANTITIES = {  # the Stage-1 LoRD's gate, read from each replicate's results.json (the run holding 'lord')
    "detect_auroc": "Detect AUROC: the gate ranks the subject's protected copies above its clean images",
    "detect_clean": "Detect: mean gate on the subject's clean images",
    "detect_protected": "Detect: mean gate on the subject's protected copies",
    "stage1_clean": "Stage 1, in-sample: mean gate on clean training images (t = 50, 200, 400)",
    "stage1_perturbed": "Stage 1, in-sample: mean gate on their perturbed copies",
}


def gate_values(out: Path, declared: Declared, archive: Path | None = None) -> dict:
    """``{quantity: {replicate: value}}`` of the Stage-1 gate (:data:`GATE_QUANTITIES`, plus
    ``stage1_clean_t<T>`` / ``stage1_perturbed_t<T>`` per timestep band) for every finished replicate whose
    run trained the LoRD (the experiment's 'lord' method); empty when none did."""
    values: dict = {}
    if "lord" not in declared.methods:
        return values
    for r in declared.replicates:
        results, _ = declared.source(out, "lord", r)
        found = kept_results(results, out, archive)
        if not found.is_file():
            continue
        data = json.loads(found.read_text(encoding="utf-8"))
        got = {}
        det = data.get("detection") or {}
        if det.get("available") and det.get("scores_clean") and det.get("scores_protected"):
            got["detect_auroc"] = det["summary"]["auroc"]
            got["detect_clean"] = sum(det["scores_clean"]) / len(det["scores_clean"])
            got["detect_protected"] = sum(det["scores_protected"]) / len(det["scores_protected"])
        sep = ((data.get("provenance") or {}).get("stage1") or {}).get("gate_separation_train") or {}
        if "mean_gate_clean" in sep:
            got["stage1_clean"], got["stage1_perturbed"] = sep["mean_gate_clean"], sep["mean_gate_perturbed"]
            for t, band in sorted((sep.get("by_timestep") or {}).items(), key=lambda kv: int(kv[0])):
                got[f"stage1_clean_t{t}"], got[f"stage1_perturbed_t{t}"] = band["mean_gate_clean"], band["mean_gate_perturbed"]
        for k, v in got.items():
            values.setdefault(k, {})[r] = float(v)
    return values


def summarise_gates(values: dict) -> dict:
    """Mean and 95% t interval over replicates of each gate quantity (:func:`gate_values`)."""
    from lord_ops import analysis as an

    out = {}
    for k, per in values.items():
        if len(per) >= 2:
            mean, _, low, high = an.mean_interval(list(per.values()))
            out[k] = {"n": len(per), "mean": mean, "ci_low": low, "ci_high": high,
                      "per_replicate": {str(r): v for r, v in sorted(per.items())}}
    return out


def analyse(values: dict, declared: Declared, seed: int = 0) -> dict:
    """Every contrast whose methods were run, per metric: paired summary over the replicates every
    method of the contrast has; the declared family (primary-metric questions and any ``metric:contrast``
    co-primary ones) Holm-adjusted together; LoRD's share of A."""
    from lord_ops import analysis as an

    out = {"experiment": declared.name, "purpose": declared.purpose, "methods": list(declared.methods),
           "primary": PRIMARY, "family": list(declared.family), "metrics": {}}
    summaries = {}  # (metric, contrast) -> its summary, for the family's Holm correction
    for metric, (label, _, lower_better) in METRICS.items():
        per = values.get(metric, {})
        rows = {}
        arm_contrasts = {a.contrast.name for a in declared.arms}
        for c in declared.contrasts:
            if not all(m in declared.methods for m in c.methods):
                continue
            reps, series = an.aligned(*(per.get(m, {}) for m in c.methods))
            if len(reps) < 2:
                continue
            if c.name in arm_contrasts and len(reps) < len(declared.replicates):
                # the declared stopping rule: an arm is analysed only when all its replicates finished
                out.setdefault("unfinished_arms", {})[c.name] = len(reps)
                continue
            d = [sum(w * series[i][j] for i, (_, w) in enumerate(c.weights)) for j in range(len(reps))]
            summary = an.describe(d, seed=seed)
            rows[c.name] = {"question": c.question, "replicates": reps, **summary.to_dict(), "_summary": summary}
        for name, row in rows.items():
            summaries[metric, name] = row.pop("_summary")
        shares = {}  # per defended pair (protected, clean): the share of A that remains under it
        for prot, clean in REMAINING_PAIRS:
            if "A" not in rows or prot not in declared.methods or clean not in declared.methods:
                continue
            reps, (lp, lc, at, cl) = an.aligned(*(per.get(m, {}) for m in (prot, clean, "attacking", "clean")))
            if len(reps) >= 2:
                shares[prot] = an.ratio_of_means([a - b for a, b in zip(lp, lc)], [a - b for a, b in zip(at, cl)],
                                                 seed=seed)
                shares[prot]["definition"] = (f"mean({prot} - {clean}) / mean(A): the share of the attack's effect "
                                              f"that remains under {prot} (1: none removed, 0: all removed)")
        share = shares.get("lord")
        means = {m: an.mean_interval(list(per.get(m, {}).values()))[0] if len(per.get(m, {})) >= 2 else None
                 for m in declared.methods}
        out["metrics"][metric] = {"label": label, "lower_is_better": lower_better, "contrasts": rows,
                                  "method_means": means, "remaining_share_under_lord": share,
                                  "remaining_shares": shares,
                                  "replicates": {m: sorted(per.get(m, {})) for m in declared.methods}}
    asked = [(q, family_question(q)) for q in declared.family]
    family = {q: summaries[key] for q, key in asked if key in summaries}
    out["family_analysed"] = list(family)
    if family:
        an.apply_holm(family)
        for q, (metric, name) in asked:
            if q in family:
                out["metrics"][metric]["contrasts"][name]["p_holm"] = family[q].p_holm
    primary = out["metrics"][PRIMARY]["contrasts"]
    a = primary.get("A")
    out["threat_gate"] = None if a is None else {
        "d_z": a["d_z"], "rule": "if |d_z(A)| < 0.3 the attack does no measurable damage at this budget",
        "measurable": abs(a["d_z"]) >= 0.3}
    # a dose-response: the same rule per attack setting
    out["threat_gates"] = {c.name: {"d_z": primary[c.name]["d_z"], "measurable": abs(primary[c.name]["d_z"]) >= 0.3}
                           for c in (arm.contrast for arm in declared.arms + declared.reference_arms)
                           if c.name in primary}
    return out


def verdict(row: dict, confirmatory: bool) -> str:
    low, high = row["ci_low"], row["ci_high"]
    excludes = low > 0 or high < 0
    if confirmatory:
        ok = excludes and row.get("p_holm") is not None and row["p_holm"] < 0.05
        return ("established: " + ("> 0" if low > 0 else "< 0")) if ok else "not established"
    return "interval excludes 0 (exploratory)" if excludes else "interval includes 0"


def markdown(result: dict) -> str:
    lines = [f"# Replicate analysis: {result['experiment']}", "", result["purpose"], "",
             "Each row: paired differences over independent replicates (own subject bags and seeds); mean, "
             "95% t interval, effect size d_z = mean/sd, two-sided sign-flip permutation p (exact), and for the "
             "declared family (primary-metric questions and any co-primary ones) Holm's adjusted p. "
             "Decision rule (declared in EVIDENCE.md): a confirmatory question is answered when its Holm-adjusted "
             "p < 0.05 and its interval excludes 0.", ""]
    for metric, block in result["metrics"].items():
        primary = metric == result["primary"]
        asked = family_of(result, metric)
        if not block["contrasts"] and not any(v is not None for v in block["method_means"].values()):
            continue  # not measured by these runs (e.g. a metric added after they were scored)
        kind = " (primary)" if primary else " (co-primary: declared questions)" if asked else " (secondary, exploratory)"
        lines += [f"## {block['label']}" + kind,
                  "", "lower is better" if block["lower_is_better"] else "higher is better", ""]
        means = ", ".join(f"{m} {v:.5g}" for m, v in block["method_means"].items() if v is not None)
        lines += [f"Method means over replicates: {means}.", ""]
        lines += ["| contrast | n | mean | 95% interval | d_z | p | p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|"]
        for name, row in block["contrasts"].items():
            conf = name in asked
            holm = f"{row['p_holm']:.4g}" if row.get("p_holm") is not None else ""
            lines.append(f"| {name}{' *' if conf else ''} | {row['n']} | {row['mean']:+.4g} | "
                         f"{row['ci_low']:+.4g} to {row['ci_high']:+.4g} | {row['d_z']:+.2f} | {row['p']:.4g} | {holm} | "
                         f"{verdict(row, conf)} |")
        shares = block.get("remaining_shares") or ({"lord": block["remaining_share_under_lord"]}
                                                   if block.get("remaining_share_under_lord") else {})
        for prot, share in shares.items():
            lines += ["", f"Share of A remaining under {'LoRD' if prot == 'lord' else prot}: {share['value']:.3g} "
                          f"(95% bootstrap {share['ci_low']:.3g} to {share['ci_high']:.3g}); {share['definition']}."]
        lines += ["", "Contrasts: " + "; ".join(f"{name} = {row['question']}"
                                                for name, row in block["contrasts"].items()) + ".", ""]
    gates = result.get("gates") or {}
    if gates:
        lines += ["## The Stage-1 gate (exploratory)", "", "| quantity | n | mean | 95% interval |", "|---|---|---|---|"]
        for k, row in gates.items():
            label = GATE_QUANTITIES.get(k) or (f"Stage 1, in-sample, t = {k.rsplit('_t', 1)[1]}: mean gate on "
                                               + ("clean images" if "_clean_" in k else "perturbed copies"))
            lines.append(f"| {label} | {row['n']} | {row['mean']:.4f} | {row['ci_low']:.4f} to {row['ci_high']:.4f} |")
        lines.append("")
    gate = result.get("threat_gate")
    if gate:
        lines += [f"Threat gate (declared): d_z(A) = {gate['d_z']:+.2f}: "
                  + ("measurable threat." if gate["measurable"] else "no measurable threat at this budget."), ""]
    for name, n in (result.get("unfinished_arms") or {}).items():
        lines += [f"Not analysed (declared stopping rule): {name} has {n} of its replicates finished.", ""]
    for name, gate in (result.get("threat_gates") or {}).items():
        verdict_text = ("no measurable threat at this budget." if not gate["measurable"] else "measurable threat."
                        if gate["d_z"] > 0 else "|d_z| >= 0.3 but in the other direction: the protected copies did "
                        "not damage the LoRA (no threat).")
        lines += [f"Threat gate (declared), {name}: d_z = {gate['d_z']:+.2f}: {verdict_text}", ""]
    analysed = result.get("family_analysed")
    if analysed is not None and len(analysed) < len(result["family"]):
        lines += [f"Holm's correction is over the {len(analysed)} analysed of the {len(result['family'])} declared "
                  f"questions (EVIDENCE.md's stopping rule); with all {len(result['family'])} the adjusted p values "
                  f"would be larger.", ""]
    lines.append("`*`: the declared confirmatory family (Holm-adjusted together).")
    return "\n".join(lines) + "\n"


def _png(fig) -> bytes:
    """A matplotlib Figure as PNG bytes (no software tag: the same figure gives the same bytes)."""
    import io

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def forest_png(result: dict) -> bytes:
    """Each contrast of the primary metric with its 95% interval (a forest plot), as PNG bytes."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    block = result["metrics"][result["primary"]]
    rows = list(block["contrasts"].items())
    fig = Figure(figsize=(7, 0.45 * max(len(rows), 1) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    asked = family_of(result, result["primary"])
    for i, (name, row) in enumerate(reversed(rows)):
        conf = name in asked
        ax.plot([row["ci_low"], row["ci_high"]], [i, i], color="black" if conf else "grey")
        ax.plot([row["mean"]], [i], "o", color="black" if conf else "grey")
    ax.axvline(0, color="red", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n + (" *" if n in asked else "") for n, _ in reversed(rows)])
    ax.set_xlabel(f"difference in {block['label']} (95% interval over replicates)")
    ax.set_title(f"{result['experiment']}: paired contrasts (* confirmatory)")
    return _png(fig)



def sample_grid_png(out: Path, declared: Declared, per_method: int = 8) -> tuple[bytes, int] | None:
    """``(PNG bytes, replicate)``: the first ``per_method`` samples of every method of ``declared`` (one row each,
    labelled) from its first replicate whose runs still have their samples in ``out`` (the archive keeps only
    results.json); None when no replicate has them all."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    read: dict = {}  # each results.json once (several methods come from the same run)
    for replicate in declared.replicates:
        rows = []
        for method in declared.methods:
            results, name = declared.source(out, method, replicate)
            try:
                if results not in read:
                    read[results] = json.loads(Path(results).read_text())
                paths = read[results]["methods"][name]["samples"][:per_method]
                images = [np.asarray(Image.open(Path(results).parent / p).convert("RGB")) for p in paths]
            except (OSError, KeyError, ValueError):
                break
            if not images:
                break
            rows.append((method, np.concatenate(images, axis=1)))
        if len(rows) != len(declared.methods):
            continue
        height, width = rows[0][1].shape[:2]
        fig = Figure(figsize=(max(4.0, width / 40 + 1.6), len(rows) * max(0.55, height / 40 + 0.15)))
        FigureCanvasAgg(fig)
        for i, (method, strip) in enumerate(rows):
            ax = fig.add_subplot(len(rows), 1, i + 1)
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(method, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(f"{declared.name}: replicate {replicate}, the first {per_method} samples per method", fontsize=9)
        return _png(fig), replicate
    return None


def share_curve_png(result: dict) -> bytes | None:
    """The paper's Fig. 7 from the replicates: the primary metric's mean (95% t interval over replicates) at 0, 2,
    4, 6 and 8 of 8 images protected, per series; None when the experiment has no share points."""

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lord_ops import analysis as an

    values = result.get("values", {}).get(result["primary"], {})
    present = {label: series for label, series in SHARE_SERIES.items()
               if all(len(values.get(m, {})) >= 2 for m in series)}
    if "plain LoRA" not in present or len(present) < 2:
        return None
    fig = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shifts = [0.16 * (i - (len(present) - 1) / 2) for i in range(len(present))]
    for (label, series), shift in zip(present.items(), shifts):
        stats = [an.mean_interval(list(values[m].values())) for m in series]
        x = [k + shift for k in SHARE_POINTS]
        ax.errorbar(x, [st[0] for st in stats], yerr=[[st[0] - st[2] for st in stats], [st[3] - st[0] for st in stats]],
                    marker="o", capsize=3, label=label)
    ax.set_xticks([0, 2, 4, 6, 8])
    ax.set_xlabel("protected images of 8")
    ax.set_ylabel(f"{result['metrics'][result['primary']]['label']} (lower is better)")
    ax.set_title(f"{result['experiment']}: mean over {len(next(iter(values.values())))} replicates (95% t)")
    ax.legend()
    return _png(fig)


def report(args) -> int:
    from lord_ops.atomic import atomic_write, atomic_write_json

    declared = EXPERIMENTS[args.experiment]
    values = replicate_values(Path(args.out), declared, args.archive)
    result = analyse(values, declared)
    result["values"] = values
    result["gates"] = summarise_gates(gate_values(Path(args.out), declared, args.archive))
    folder = Path(args.out) / declared.home / (declared.name if declared.home != declared.name else "")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "analysis.json", result)
    text = markdown(result)
    atomic_write(folder / "analysis.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if result["metrics"][PRIMARY]["contrasts"]:
        png = forest_png(result)
        atomic_write(folder / "forest.png", lambda tmp: Path(tmp).write_bytes(png))
    curve = share_curve_png(result)
    if curve is not None:
        atomic_write(folder / "share_curve.png", lambda tmp: Path(tmp).write_bytes(curve))
    grid = sample_grid_png(Path(args.out), declared)
    if grid is not None:  # where a reader sees the painted target (or its absence) per method
        atomic_write(folder / "samples.png", lambda tmp: Path(tmp).write_bytes(grid[0]))
    print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Replicated paired experiments on the lab model (EVIDENCE.md).")
    ap.add_argument("command", choices=("run", "report", "carry", "restore"),
                    help="run or resume replicates; report: the analysis; carry: copy the unfinished replicates' stages "
                         "into the repository (lab/carry.py; safe beside running workers); restore: copy them back into --out "
                         "(run does it per replicate)")
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--out", default="evidence_output", help="output folder (one subfolder per experiment)")
    ap.add_argument("--scale", default="demo", choices=sorted(HELDOUT_IMAGES),
                    help="lab/experiment.py's scale of every replicate (ci: the structure in minutes)")
    ap.add_argument("--replicates", help="which replicates, e.g. 10-17 (default: the experiment's declared ones)")
    ap.add_argument("--worker", help="k/K: run the replicates r with r %% K == k, k from 0 to K-1 (0/2 and 1/2: two processes "
                         "share the work)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    ap.add_argument("--archive", type=Path, default=None,
                    help=f"where finished demo-scale replicates' results.json are kept and read back (default "
                         f"{ARCHIVE.relative_to(ARCHIVE.parent.parent.parent)}: in the repository)")
    ap.add_argument("--parts", help="the lab model's parts file (default: the shipped one of the experiment's lab model)")
    ap.add_argument("--classifier", help="its lab classifier (default: the shipped one)")
    ap.add_argument("--rerun-archived", action="store_true",
                    help="run archived replicates again (default: an archived replicate missing from --out is skipped)")
    ap.add_argument("--only", metavar="PATTERN",
                    help="run only these stages of each replicate and what they need (the runner's --only, e.g. "
                         "'detect'); no report is written, so nothing is archived: for explorations")
    ap.add_argument("--carry", type=Path, default=None,
                    help="where carry keeps unfinished replicates' stages and restore/run read them (default "
                         "docs/evidence/carry: in the repository)")
    ap.add_argument("--every", type=float, default=None, metavar="S",
                    help="carry: save again every S seconds until interrupted (beside running workers)")
    args = ap.parse_args(argv)
    return {"run": run, "report": report, "carry": carry_stages, "restore": carry_stages}[args.command](args)


def carry_stages(args) -> int:
    """``carry`` / ``restore``: :mod:`lab.carry` over every folder of the experiment (its arms' too)."""
    declared = EXPERIMENTS[args.experiment]
    action = carry.save if args.command == "carry" else carry.restore
    folders = [run_folder(declared, a) for a in declared.arms] if declared.arms else [run_folder(declared)]
    every = args.every if args.command == "carry" else None
    while True:
        for folder in folders:
            done = action(Path(args.out), folder, args.carry or carry.CARRY)
            if every is None or done.copied or done.removed:
                stamp = time.strftime("%H:%M:%S ") if every else ""
                for line in done.lines():
                    print(f"[evidence] {stamp}{args.command} {folder}: {line}", flush=True)
        if every is None:
            return 0
        time.sleep(every)


if __name__ == "__main__":
    sys.exit(main())
