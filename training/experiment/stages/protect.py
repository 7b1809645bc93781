"""Stage ``protect`` (protocol mode): the clean instance images protected with the attack preset
(``[attack]``), rounded to 8 bits as a published protected image is."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lord_ops.atomic import atomic_write_json
from lord_ops.attacks import check_8bit_budget, image_seed, latent_contrast, preset
from lord_ops.comfy import grad
from lord_ops.comfy.protect import Protection, protect
from training.experiment.context import ExperimentContext
from training.experiment.images import load_set, read_png, save_png, u8_chw, unit_hwc
from training.pipeline import Stage, read_json


def stages(ctx: ExperimentContext) -> list[Stage]:
    if not ctx.protocol:
        return []
    key = {**ctx.base_key(), "images": ctx.image_key(ctx.clean), "attack": attack_key(ctx)}
    aware = ctx.exp.attack_defense_aware
    if aware:  # the adaptive attacker: the protection is computed against the model with the Stage-1 LoRD live
        key["defense_aware"] = ctx.lord_key("stage1")
        if ctx.exp.attack_gate_evasion:  # ... and also pushes its gate down (absent at 0: older keys stay valid)
            key["gate_evasion"] = ctx.exp.attack_gate_evasion
    return [Stage("protect", key, lambda folder: run(ctx, folder), needs=ctx.lord_needs("stage1") if aware else (),
                  describe=f"protect {len(ctx.names)} image(s) with {ctx.exp.attack_preset}"
                           + (" against the LoRD-defended model" if aware else "")
                           + (f", evading its gate (weight {ctx.exp.attack_gate_evasion:g})"
                              if aware and ctx.exp.attack_gate_evasion else ""))]


def attack_key(ctx: ExperimentContext) -> dict:
    exp = ctx.exp
    return {"preset": exp.attack_preset, "steps": exp.attack_steps, "rounds": exp.attack_rounds, "seed": exp.attack_seed,
            **({"epsilon": exp.attack_epsilon, "step_size": exp.attack_step_size}
               if exp.attack_epsilon or exp.attack_step_size else {}),
            "target": ctx.digests(exp.attack_target) if exp.attack_target else None, "prompt": exp.prompt,
            "class_images": ctx.class_key()}


def run(ctx: ExperimentContext, folder: Path) -> dict:
    if not ctx.exp.attack_gate_evasion:
        return _run(ctx, folder)
    from lord_ops.comfy.evasion import evading_gates

    with evading_gates(ctx.lord_model(ctx.rt.models()[0], "stage1"), ctx.exp.attack_gate_evasion) as (model, penalty):
        result = _run(ctx, folder, model, penalty)
    result["attack"]["gate_evasion"] = penalty.summary()
    return result


def _run(ctx: ExperimentContext, folder: Path, attacked=None, gate_penalty=None) -> dict:
    """Protect the images; ``attacked``: the MODEL to attack instead of the base (or LoRD-defended) one
    (the gate-evasion attacker's gate-recording clone, read by ``gate_penalty``)."""
    exp = ctx.exp
    chosen = preset(exp.attack_preset)
    overrides = {k: v for k, v in (("steps", exp.attack_steps), ("epsilon", exp.attack_epsilon),
                                   ("step_size", exp.attack_step_size)) if v}
    attack = dataclasses.replace(chosen.attack, seed=exp.attack_seed, **overrides).validate()
    check_8bit_budget(attack.epsilon, "[attack] epsilon" if exp.attack_epsilon else "[attack] preset")
    surrogate = chosen.surrogate
    if surrogate is not None and exp.attack_rounds:
        surrogate = dataclasses.replace(surrogate, rounds=exp.attack_rounds)
    model, clip, vae = ctx.rt.models()
    if attacked is not None:
        model = attacked
    elif exp.attack_defense_aware:  # gradients (and a surrogate's LoRA training) through the LoRD-patched model
        model = ctx.lord_model(model, "stage1")
    cond = ctx.rt.encode(exp.prompt)
    target = None
    if exp.attack_target is not None:
        target = unit_hwc(read_png(exp.attack_target))[None]
    classes, class_cond = None, None
    if surrogate is not None and exp.class_images is not None:
        classes = [unit_hwc(im)[None] for im in load_set(exp.class_images, exp.resolution).values()]
        class_cond = ctx.rt.encode(exp.class_text)
    out = folder / "images"
    todo = [n for n in ctx.names if not (out / f"{n}.png").is_file()]
    reports = read_json(folder / "reports.json") or {}
    step = [0]

    def progress(done, total, loss, _preview):
        step[0] += 1
        if done == total or step[0] % max(1, total // 10) == 0:
            ctx.log(f"    protect: step {done}/{total} loss {loss:.4g}")

    if surrogate is not None and todo:  # the published loops attack the set as a whole
        todo = list(ctx.names)
        images = [unit_hwc(ctx.clean[n])[None] for n in todo]
        perturbed, report = protect(model, vae, cond, images, Protection(attack, surrogate, target, classes, class_cond,
                                                                         gate_penalty), progress)
        for i, n in enumerate(todo):
            save_png(out / f"{n}.png", u8_chw(perturbed[i]))
        reports = {"set": {k: v for k, v in report.items() if k != "loss_traces"},
                   "final_loss": [tr[-1] if tr else None for tr in report["loss_traces"]]}
    else:
        for n in todo:
            one = dataclasses.replace(attack, seed=image_seed(exp.attack_seed, ctx.names.index(n)))
            perturbed, report = protect(model, vae, cond, unit_hwc(ctx.clean[n])[None],
                                        Protection(one, target=target, gate_penalty=gate_penalty), progress)
            save_png(out / f"{n}.png", u8_chw(perturbed))
            reports[n] = {"final_loss": report["loss_traces"][0][-1] if report["loss_traces"][0] else None}
            atomic_write_json(folder / "reports.json", reports)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    contrast = None
    if attack.method in ("ace", "ace_plus"):  # is the target representable on this model's latent grid?
        like = unit_hwc(ctx.clean[ctx.names[0]])[None].movedim(-1, 1)
        contrast = round(latent_contrast(grad.encode_target(vae, model, None if target is None
                                                             else target.movedim(-1, 1), like)), 6)
    return {"images": len(ctx.names), "attack": {"preset": exp.attack_preset, **dataclasses.asdict(attack),
                                                 "target_latent_contrast": contrast,
                                                 "vae_downscale": grad.vae_downscale(vae),  # the score stage's cell
                                                 "surrogate": dataclasses.asdict(surrogate) if surrogate else None,
                                                 "defense_aware": exp.attack_defense_aware,
                                                 "gate_evasion": None,
                                                 "target": str(exp.attack_target) if exp.attack_target else "pattern"}}
