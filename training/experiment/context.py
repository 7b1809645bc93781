"""What the stages of one experiment share: the config, the stage plan, the loaded models, the image
sets and the pieces of stage keys (digests of inputs) that several stages use.

Building a context is cheap; :meth:`ExperimentContext.prepare` reads the image folders and hashes the
checkpoint, :meth:`Runtime.models` loads it on first use.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Optional

from lord_ops import metric_models as mm
from lord_ops.comfy.bootstrap import load_checkpoint_models
from lord_ops.comfy.generate import SamplingConfig, cached_encoder
from lord_ops.comfy.patch import apply_lord
from lord_ops.datasets import tensor_digest
from lord_ops.format import load_lord_file
from lord_ops.weights import FileHashes
from training.experiment_config import ConfigError, Experiment
from training.experiment.images import load_set, read_png
from training.experiment.metric_plan import metric_plan
from training.pipeline import Plan, digest


class Runtime:
    """What stages share in one process: the loaded checkpoint, encoded prompts, metric networks."""

    def __init__(self, exp: Experiment, log: Callable[[str], None]):
        self.exp, self.log = exp, log
        self._models = None
        self._metric_models: dict = {}
        self._encode = None

    def models(self):
        """``(MODEL, CLIP, VAE)`` of the checkpoint, loaded once per process."""
        if self._models is None:
            t0 = time.time()
            self._models = load_checkpoint_models(self.exp.checkpoint)
            self.log(f"loaded {self.exp.checkpoint.name} in {time.time() - t0:.1f} s")
        return self._models

    def encode(self, text: str):
        """The CLIP conditioning of ``text``, encoded once per process (``cached_encoder``)."""
        if self._encode is None:
            self._encode = cached_encoder(self.models()[1])
        return self._encode(text)

    def metric_model(self, kind: str):
        """The metric network ``clip_iqa``, ``inception`` or ``extractor`` ([metrics]), loaded once."""
        if kind not in self._metric_models:
            m = self.exp.metrics
            if kind == "clip_iqa":
                self._metric_models[kind] = mm.load_clip_iqa(m.clip_iqa_model, m.clip_iqa_weights, device=device())
            elif kind == "inception":
                self._metric_models[kind] = mm.load_inception(m.inception_weights, m.fid_features, device=device())
            else:
                self._metric_models[kind] = mm.load_feature_extractor(m.extractor, m.extractor_weights, device=device())
        return self._metric_models[kind]


def device():
    """ComfyUI's compute device."""
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def sampling_config(exp: Experiment, steps: Optional[int] = None, batch_size: Optional[int] = None) -> SamplingConfig:
    """The generation settings as ComfyUI's sampler takes them (``lord_ops.comfy.generate``), checked
    against this ComfyUI (sampler/scheduler names): a problem becomes a ConfigError naming the field."""
    s = exp.sampling
    try:
        return SamplingConfig(steps=steps or s.steps, cfg=s.cfg, sampler=s.sampler, scheduler=s.scheduler,
                              width=exp.resolution, height=exp.resolution, batch_size=batch_size or s.batch_size,
                              negative=s.negative).validate()
    except ValueError as e:
        field = str(e).split(":", 1)[0].replace("SamplingConfig.", "")
        raise ConfigError(f"{exp.config_path}: [sampling] {field}: {str(e).split(':', 1)[-1].strip()}") from e


class ExperimentContext:
    """One experiment's shared state. ``prepare()`` reads the subject images and hashes the checkpoint
    (cached in ``<output>/file_digests.json``); the stages read the rest through the methods below."""

    def __init__(self, exp: Experiment, log: Callable[[str], None] = print):
        self.exp, self.log = exp, log
        self.rt = Runtime(exp, log)
        self.plan = Plan(exp.output, log)
        self.metrics = metric_plan(exp)
        self.digests: Optional[FileHashes] = None
        self.clean: dict = {}
        self.given_protected: dict = {}
        self.names: list[str] = []
        self.ckpt_sha: Optional[str] = None
        self.reference = None  # what the reference features are computed from (set by the reference stage)

    def prepare(self) -> None:
        """Read the subject's images (clean originals, given protected copies) and hash the checkpoint."""
        exp = self.exp
        exp.output.mkdir(parents=True, exist_ok=True)
        self.digests = FileHashes(exp.output / "file_digests.json")
        self.clean = load_set(exp.instance_images, exp.resolution) if exp.instance_images else {}
        self.given_protected = load_set(exp.protected_images, exp.resolution) if exp.protected_images else {}
        if self.clean and self.given_protected and set(self.clean) != set(self.given_protected):
            only_c = sorted(set(self.clean) - set(self.given_protected))
            only_p = sorted(set(self.given_protected) - set(self.clean))
            raise ConfigError(f"{exp.config_path}: [subject] instance_images and protected_images must hold the same "
                              f"file names (originals and their protected versions); only in originals: {only_c[:5]}, "
                              f"only in protected: {only_p[:5]}")
        self.names = sorted(self.clean or self.given_protected)
        self.ckpt_sha = self.digests(exp.checkpoint)

    # ---- pieces of stage keys ------------------------------------------------------------------
    @property
    def protocol(self) -> bool:
        return self.exp.mode == "protocol"

    def image_key(self, images: dict) -> str:
        """Digest of an image set (names and 8-bit contents)."""
        return digest({n: tensor_digest(images[n]) for n in sorted(images)})

    def base_key(self) -> dict:
        return {"checkpoint": self.ckpt_sha, "resolution": self.exp.resolution}

    def class_key(self):
        """The prior-preservation class images and prompt (None without class images)."""
        from lord_ops.datasets import image_files

        if self.exp.class_images is None:
            return None
        return {"files": {f.name: self.digests(f) for f in image_files(self.exp.class_images)},
                "prompt": self.exp.class_text}

    def lord_key(self, which: str = "stage1"):
        """The Stage-1 adapter ``which`` (``stage1``: the LoRD, ``stage1_onebranch``: the control)."""
        given = self.exp.stage1_lord and which == "stage1"
        return {"file": self.digests(self.exp.stage1_lord)} if given else {"stage": which}

    def lord_needs(self, which: str = "stage1") -> tuple:
        return () if (self.exp.stage1_lord and which == "stage1") else (which,)

    def protected_needs(self) -> tuple:
        return ("protect",) if self.protocol else ()

    def protected_key(self):
        return self.image_key(self.given_protected) if self.exp.mode == "artist" else {"stage": "protect"}

    def metrics_key(self) -> dict:
        m = self.exp.metrics
        return {"plan": self.metrics, "class": self.exp.class_name,
                "clip_iqa": self.digests(m.clip_iqa_weights) if m.clip_iqa_weights else None,
                "inception": self.digests(m.inception_weights) if m.inception_weights else None,
                "extractor": self.digests(m.extractor_weights) if m.extractor_weights else None,
                "kid": [m.kid_subsets, m.kid_subset_size], "fd_bootstrap": m.fd_bootstrap, "seed": self.exp.seed,
                "fd_pca_dims": m.fd_pca_dims, "hf_low_cut": m.hf_low_cut,
                "attack_target": self.digests(self.exp.attack_target) if self.exp.attack_target else None}

    # ---- image sets ----------------------------------------------------------------------------
    def mix_names(self, k: int) -> list:
        """The ``k`` instance images that are protected in a sweep point (a seeded choice)."""
        order = list(self.names)
        random.Random(self.exp.seed).shuffle(order)
        return sorted(order[:k])

    def protected(self) -> dict:
        """The protected instance images ``{name: uint8 [3, H, W]}`` (given, or made by ``protect``)."""
        if self.exp.mode == "artist":
            return self.given_protected
        folder = self.plan.folder("protect") / "images"
        return {n: read_png(folder / f"{n}.png") for n in self.names}

    def purified(self, purifier: str) -> dict:
        folder = self.plan.folder(f"purify/{purifier}") / "images"
        return {n: read_png(folder / f"{n}.png") for n in self.names}

    def lord_path(self, which: str = "stage1") -> Path:
        if which == "stage1" and self.exp.stage1_lord:
            return self.exp.stage1_lord
        return self.plan.folder(which) / "lord.safetensors"

    def lord_model(self, model, which: str = "stage1", gate_mode: str = "learned", defense_strength: float = 1.0):
        """``model`` with the experiment's LoRD (or the one-branch control's adapter) applied (a patched
        clone), its gate learned or forced (``clean``: 0, ``defense``: 1), ``B'`` scaled by
        ``defense_strength``."""
        return apply_lord(model, load_lord_file(self.lord_path(which)), gate_mode=gate_mode,
                          defense_strength=defense_strength)

    def sampling_strength(self, v) -> float:
        """B''s scale for Stage-2 run ``v`` at test time (sampling, held-out loss): its ``lord_b<k>`` k, else
        ``[lord] defense_strength``."""
        return self.exp.defense_strength if v.defense_strength is None else v.defense_strength

    def method_model(self, v):
        """``(MODEL, VAE)`` of Stage-2 run ``v`` at test time: the base model, its Stage-1 adapter (gate
        at ``v``'s sampling setting, B' at :meth:`sampling_strength`) for LoRD / one-branch runs, and the
        LoRA that ``train/<v.train_id>`` trained, applied with ComfyUI's own LoRA loader."""
        import comfy.sd

        from lord_ops.comfy.patch import load_lora_for_model

        model, clip, vae = self.rt.models()
        if v.lord:
            model = self.lord_model(model, v.lord, gate_mode=v.gates[1], defense_strength=self.sampling_strength(v))
        lora = load_lora_for_model(model, self.plan.folder(f"train/{v.train_id}") / "lora.safetensors")
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        return model, vae

    def on_step(self, what: str):
        """A trainer ``on_step`` that logs about ten lines per run."""
        def on_step(rec):
            if rec.step == rec.steps or rec.step % max(1, rec.steps // 10) == 0:
                self.log(f"    {what}: step {rec.step}/{rec.steps} loss {rec.loss:.5f}")
        return on_step
