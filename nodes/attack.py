"""LoRD Protect (Attack): PGD/AdvDM, ACE, ACE+ and PhotoGuard perturbations of IMAGEs."""
from __future__ import annotations

import contextlib
import json

from comfy_api.latest import io

from ..lord_ops.attacks import ALL_PRESETS, METHODS, AttackConfig, check_8bit_budget, preset as get_preset, published_to_levels

PRESET_OPTIONS = ["custom", *ALL_PRESETS]


class LoRDProtect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRDProtect",
            display_name="LoRD Protect / Attack",
            category="LoRD",
            description="Add an adversarial perturbation to images: ACE/ACE+ (mist-v2) and PhotoGuard protect "
                        "images from LoRA fine-tuning and editing; PGD (AdvDM/Anti-DreamBooth) is the "
                        "perturbation LoRD trains against. Strength is in pixel levels (0..255).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the perturbation targets (not used by photoguard)."),
                io.Vae.Input("vae", tooltip="The VAE of that model; the gradients reach the pixels through its encoder."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning, e.g. 'a photo of a person'."),
                io.Image.Input("image", tooltip="Images to protect: IMAGE [B,H,W,C] in 0..1, any size (padded to a "
                                                "multiple of 8 internally, cropped back)."),
                io.Combo.Input("method", options=list(METHODS), default="ace",
                               tooltip="pgd: maximise the denoising loss; ace: pull the noise prediction to the "
                                       "target latent; ace_plus: ace + latent pull; photoguard: encoder attack."),
                io.Float.Input("strength", default=round(published_to_levels(8 / 255), 3), min=1.0, max=64.0, step=0.5,
                               tooltip="L-inf budget in pixel levels 0..255 (mist-v2 default = 4); at least 1 "
                                       "(a smaller budget is erased by the 8-bit output)."),
                io.Float.Input("step_size", default=round(published_to_levels(0.005), 4), min=0.05, max=16.0, step=0.05, round=0.0001,
                               tooltip="Step per iteration in pixel levels."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Attack iterations (PGD steps)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the attack's timesteps and noise; image i of a batch uses seed + i."),
                io.Boolean.Input("low_memory", default=False, tooltip="Encode without a graph, back-propagate "
                                                                     "through a checkpointed re-encode (less VRAM)."),
                io.Image.Input("target", optional=True, tooltip="ACE/ACE+/PhotoGuard target image (mist-v2 and the "
                                                               "paper use mist-v2's data/MIST.png: load it here); "
                                                               "default: the pack's high-contrast pattern "
                                                               "(photoguard: zero latent)."),
                io.Combo.Input("preset", options=PRESET_OPTIONS, default="custom", optional=True,
                               tooltip="custom: the widgets above, against the fixed MODEL. mist_v2 / "
                                       "anti_dreambooth_aspl / anti_dreambooth_fsmg: the published attacks with "
                                       "their own numbers (they fine-tune a surrogate LoRA on the batch during the "
                                       "attack; the widgets except seed and low_memory are ignored). *_fixed, "
                                       "pgd_*, photoguard_encoder: fixed-model presets. Details: README."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Surrogate presets only: class images (e.g. generated with the class "
                                       "prompt) for DreamBooth prior preservation in the surrogate's fine-tuning "
                                       "steps, as mist-v2 and Anti-DreamBooth do; without them the surrogate "
                                       "trains on the protected images alone."),
                io.Conditioning.Input("class_positive", optional=True,
                                      tooltip="The class prompt of class_images (default: positive)."),
                io.Float.Input("gate_evasion", default=0.0, min=0.0, max=1000.0, step=0.5, optional=True,
                               tooltip="An attacker who knows the defense: the MODEL must carry a LoRD (Load LoRD "
                                       "first); each attack step also pushes that LoRD's learned gate down by this "
                                       "weight x the mean gate, so the defense does not switch its branch B' on "
                                       "for the protected image. 0 = off. Not with photoguard (no UNet pass)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="Perturbed images (8-bit exact, within strength)."),
                io.Image.Output(display_name="perturbation", tooltip="Grey = unchanged; white/black = +/- strength."),
                io.String.Output(display_name="report", tooltip="JSON: parameters and per-image loss traces."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, image, method, strength, step_size, steps, seed, low_memory, target=None,
                preset="custom", class_images=None, class_positive=None, gate_evasion=0.0):
        import dataclasses

        import comfy.model_management
        import comfy.utils
        from PIL import Image

        from ..lord_ops.comfy.protect import Protection, perturbation_view, protect

        surrogate = None
        if preset in (None, "", "custom"):
            check_8bit_budget(float(strength), "strength")
            config = AttackConfig(method=method, epsilon=float(strength), step_size=float(step_size), steps=int(steps),
                                  seed=int(seed), low_memory=bool(low_memory)).validate()
        else:
            chosen = get_preset(preset)
            surrogate = chosen.surrogate
            config = dataclasses.replace(chosen.attack, seed=int(seed),
                                         low_memory=bool(low_memory) or chosen.attack.low_memory).validate()
        pbar = comfy.utils.ProgressBar(1)

        def on_progress(done, total, loss, current):
            comfy.model_management.throw_exception_if_processing_interrupted()
            shown = None
            if current is not None:
                arr = (current[0].movedim(0, -1).clamp(0, 1) * 255).byte().cpu().numpy()
                shown = ("JPEG", Image.fromarray(arr), 512)
            pbar.update_absolute(done, total, shown)

        weight = float(gate_evasion or 0.0)  # 0: off; GatePenalty refuses a negative weight
        with contextlib.ExitStack() as stack:
            penalty = None
            if weight:
                from ..lord_ops.comfy.evasion import evading_gates

                model, penalty = stack.enter_context(evading_gates(model, weight))
            perturbed, rep = protect(model, vae, positive, image, Protection(config, surrogate, target, class_images,
                                                                            class_positive, penalty), on_progress)
        report = {"preset": preset or "custom", "method": config.method, "strength_levels": config.epsilon,
                  "step_size_levels": config.step_size, "steps": config.steps, "seed": config.seed,
                  "surrogate": dataclasses.asdict(surrogate) if surrogate is not None else None,
                  "loss_traces": [[round(v, 6) for v in t] for t in rep["loss_traces"]]}
        if penalty is not None:  # the LoRD's mean learned gate on the attack's first and last pass
            report["gate_evasion"] = penalty.summary()
        if surrogate is not None:
            report["surrogate_losses"] = [{"round": r["round"], "clean": [round(v, 6) for v in r["clean_losses"]],
                                           "perturbed": [round(v, 6) for v in r["train_losses"]]} for r in rep["rounds"]]
        return io.NodeOutput(perturbed, perturbation_view(image, perturbed, config.epsilon), json.dumps(report))
