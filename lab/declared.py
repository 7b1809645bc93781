"""The experiments EVIDENCE.md declares, as data: replicates and seeds, methods, attacks, the questions
(contrasts of per-replicate method values) and each confirmatory family (Holm-adjusted together).

Declared before their runs and changed only by adding (a declared experiment keeps its questions): an experiment
is a :class:`Declared`, a dose-response arm an :class:`Arm`, a question a :class:`Contrast` in ``CONTRASTS``.
``lab.evidence`` runs and reports them.

Seed ranges (never reuse an exploration replicate to confirm): replicates 0-9 are **exploration**
(the pilots), 10-31 **confirmatory**; replicate ``r`` uses seed ``1000 + r`` (:func:`replicate_seed`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from lab.experiment import ATTACK
from training.experiment_config import Experiment as ExperimentSettings

SEED_BASE = 1000
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
    # each purifier with its clean-image control (<purifier>_clean: the clean images purified, then a plain LoRA),
    # laid out like LoRD's removal and cost questions
    *(Contrast(f"removal_{purifier}", ((purifier, 1), (f"{purifier}_clean", -1), ("attacking", -1), ("clean", 1)),
               f"{what}: its protected-minus-clean difference (both purified) minus A (negative: it removes part "
               "of the attack's damage)") for purifier, what in PURIFIER_SETTINGS),
    *(Contrast(f"cost_{purifier}", ((f"{purifier}_clean", 1), ("clean", -1)),
               f"{what} of the clean images, then a plain LoRA, minus the plain LoRA on the clean images (what the "
               "purifier costs when nothing was attacked)") for purifier, what in PURIFIER_SETTINGS),
    *(Contrast(f"{purifier}_vs_clean", ((purifier, 1), ("clean", -1)),
               f"{what} of the protected images, then a plain LoRA, minus the plain LoRA on the clean images (where "
               "the purifying user ends against an unprotected subject; 0: all of the damage undone at no cost)")
      for purifier, what in PURIFIER_SETTINGS),
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
                   ("lord_ace", "lord_clean_ace"), ("lord_gl0_ace", "lord_clean_gl0_ace"),
                   *((purifier, f"{purifier}_clean") for purifier, _ in PURIFIER_SETTINGS))

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
    # the declared stopping rule: "all" (one report when every replicate of every arm has finished),
    # "per_arm" (finished arms are analysed, the others reported as not run: lab 1's "threat"), "per_question"
    # (each question on the replicates where its methods finished, n stated: lab 1's "mist")
    stopping: str = "all"
    # (contrast, margin): an equivalence reading of a primary-metric contrast, declared with its margin (in the
    # metric's units) before any run: "equivalent" when the 90% interval lies inside +-margin (two one-sided
    # tests at 5%); reported beside the family, never Holm-adjusted with it
    equivalence: tuple = ()

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
    reference_arms=(Arm("aspl_32", dict(ATTACK)),), stopping="per_arm")
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
    "purification?", folder=f"threat/{MIST_32.name}", paired_with="defense", stopping="per_question",
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

# declared on 2026-12-05 before any of its runs (EVIDENCE.md, "textures_purify"): "textures_defense" found
# DiffPure-style purification removing 94% of A, more than any LoRD variant, but it had no clean-image control for
# the purifiers (what purification costs when nothing was attacked). On replicates 20-29 (replicate seeds never
# used; new crops, of the same wood sources as replicates 10-19), with their own protect (the same mist-v2-4
# attack): the plain LoRA on clean and protected images and JPEG and DiffPure-style purification of both. No Stage 1
# (no LoRD: its numbers are "textures_defense"'s). diffpure_vs_clean (= A + removal_diffpure + cost_diffpure) is
# read against a declared equivalence margin, outside the Holm family (EVIDENCE.md).
TEXTURE_PURIFY_FAMILY = ("A", "removal_diffpure", "cost_diffpure", "removal_jpeg")
TEXTURE_PURIFY_MARGIN = 0.0006  # held-out loss: a quarter of "textures"' A (+0.00239), fixed before any run
EXPERIMENTS["textures_purify"] = Declared(
    "textures_purify", ("clean", "attacking", "diffpure", "diffpure_clean", "jpeg", "jpeg_clean"), range(20, 30),
    dict(MIST_4.attack), TEXTURE_PURIFY_FAMILY,
    "confirmatory on lab model 2, new replicates: against mist-v2 at its published budget (4 levels), how much of the "
    "damage to a plain LoRA do DiffPure-style and JPEG purification remove once their cost on clean images is "
    "subtracted, what does DiffPure cost when nothing was attacked, and does a user who purifies protected images "
    "end where unprotected images would?", lab="textures",
    equivalence=(("diffpure_vs_clean", TEXTURE_PURIFY_MARGIN),))


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
