"""The Stage-2 runs an experiment compares (Table I's methods and the Fig. 7 sweep points) and the
training image set each one uses.

A :class:`Variant` is one Stage-2 run: a mode (``plain`` | ``pgd2_defense`` | ``lord`` | ``onebranch``:
Stage-2 with the one-branch control's Stage-1 adapter live instead of the LoRD) on an image set: ``clean``,
``protected``, a purified copy of the protected images (``jpeg``, ``diffpure``, ``noise``), a purified copy of the
clean images (``jpeg_clean``, ``diffpure_clean``, ``noise_clean``: what a purifier costs when nothing was
attacked) or a mix (``mix<k>``: k of the N instance images protected, a seeded choice).
"""
from __future__ import annotations

import dataclasses

from training.experiment_config import DEFENSE_STRENGTH_CODES, METHODS, ConfigError
from training.experiment.context import ExperimentContext

PURIFIERS = ("jpeg", "diffpure", "noise")
# the purified image sets: <purifier> = the protected images purified, <purifier>_clean = the clean images purified
PURIFIED_SETS = {**{p: (p, "protected") for p in PURIFIERS}, **{f"{p}_clean": (p, "clean") for p in PURIFIERS}}
STAGE1_OF = {"lord": "stage1", "onebranch": "stage1_onebranch"}  # Stage-2 mode -> its Stage-1 stage
# the oracle gate settings of a ``lord_g<t><s>`` mode: t = gate during Stage-2 training, s = at sampling
GATE_CODES = {"l": "learned", "0": "clean", "1": "defense"}


@dataclasses.dataclass
class Variant:
    """One Stage-2 run: a mode on a set of training images."""

    mode: str  # plain | pgd2_defense | lord | lord_g<t><s> | lord_b<k> | onebranch
    images: str  # clean | protected | jpeg | diffpure | noise | <purifier>_clean | mix<k>

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.images}"

    @property
    def gates(self) -> tuple[str, str]:
        """The LoRD's gate mode (``lord_ops.layer.GATE_MODES``) during Stage-2 training and at sampling:
        learned for ``lord``; ``lord_g<t><s>`` forces them (t, s in l = learned, 0 = clean, 1 = defense)."""
        if self.mode.startswith("lord_g") and len(self.mode) == 8:
            return GATE_CODES[self.mode[6]], GATE_CODES[self.mode[7]]
        return "learned", "learned"

    @property
    def defense_strength(self):
        """B''s scale at sampling and in the held-out loss that a ``lord_b<k>`` mode fixes (k = 05: 0.5);
        None: the experiment's ``[lord] defense_strength``. Training always runs B' as trained (1)."""
        if self.mode.startswith("lord_b"):
            return DEFENSE_STRENGTH_CODES[self.mode[6:]]
        return None

    @property
    def train_id(self) -> str:
        """The Stage-2 training run this variant samples from (gate and B'-strength variants that train alike
        share it)."""
        if self.mode.startswith("lord_g"):
            code = self.mode[6]
            return f"lord-{self.images}" if code == "l" else f"lord_g{code}-{self.images}"
        if self.mode.startswith("lord_b"):
            return f"lord-{self.images}"
        return self.id

    @property
    def lord(self):
        """The Stage-1 stage whose adapter is live in this run (``stage1``, ``stage1_onebranch``) or None."""
        return STAGE1_OF.get("lord" if self.mode.startswith(("lord_g", "lord_b")) else self.mode)

    @property
    def stage2_mode(self) -> str:
        """The Stage-2 trainer's mode (a one-branch run trains like a LoRD run: ``lord``)."""
        return "lord" if self.lord else self.mode


def plan_variants(ctx: ExperimentContext) -> tuple[list[Variant], dict[str, list]]:
    """The Stage-2 runs in order (the methods, then the sweep points; a run shared by both listed once)
    and the sweep ``{series: [{"share", "method"}, ...]}``."""
    exp = ctx.exp
    wanted = [Variant(METHODS[m][1], METHODS[m][2]) for m in exp.methods]
    sweep: dict[str, list] = {}
    n = len(ctx.names)
    for series in exp.sweep_series if exp.sweep_shares else ():
        for share in exp.sweep_shares:
            k = round(share * n)
            images = "clean" if k == 0 else "protected" if k == n else f"mix{k}"
            v = Variant("plain" if series == "plain" else "lord", images)
            sweep.setdefault(series, []).append({"share": share, "method": v.id})
            wanted.append(v)
    for v in wanted:
        if v.images.startswith("mix") and not 0 < int(v.images[3:]) < n:
            raise ConfigError(f"{exp.config_path}: [methods] run: a method on {v.images} protects {v.images[3:]} of "
                              f"the instance images, but [subject] instance_images holds {n}; use 1..{n - 1}")
    unique: dict[str, Variant] = {}
    for v in wanted:
        unique.setdefault(v.id, v)
    return list(unique.values()), sweep


def set_needs(ctx: ExperimentContext, images: str) -> tuple:
    """The stages that make the image set ``images``."""
    if images == "clean":
        return ()
    if images in PURIFIED_SETS:
        return (f"purify/{images}",)
    return ctx.protected_needs()


def set_key(ctx: ExperimentContext, images: str):
    """What the image set ``images`` is made of (a piece of a stage key)."""
    if images == "clean":
        return {"clean": ctx.image_key(ctx.clean)}
    if images.startswith("mix"):
        return {"clean": ctx.image_key(ctx.clean), "protected": ctx.protected_key(),
                "protected_names": ctx.mix_names(int(images[3:]))}
    return {images: ctx.protected_key() if images == "protected" else {"stage": f"purify/{images}"}}


def image_set(ctx: ExperimentContext, images: str) -> dict:
    """``{name: uint8 [3, H, W]}`` of the image set ``images``."""
    if images == "clean":
        return ctx.clean
    if images == "protected":
        return ctx.protected()
    if images in PURIFIED_SETS:
        return ctx.purified(images)
    chosen = set(ctx.mix_names(int(images[3:])))
    prot = ctx.protected()
    return {n: (prot[n] if n in chosen else ctx.clean[n]) for n in ctx.names}
