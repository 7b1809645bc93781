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

Every stage is cached under ``<output>/stages/<name>/`` and resumable (a finished stage is never
recomputed; a killed run started again continues, training from its checkpoint and sampling from the
images already written). ``--only`` runs some stages (and what they need), so independent stages can
run as separate processes or on separate GPUs on one shared output folder; ``--list`` shows the plan.
Exit status: 0 done, 1 a stage failed, 2 bad config or arguments, 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Optional


from training.experiment_config import (METHODS, SWEEP_SERIES, ConfigError, Experiment, load_config,
                                        train_config)
from training.pipeline import Plan, Stage, StageFailed, digest, read_json

RESULTS_FORMAT, RESULTS_VERSION = "comfyui-lord-experiment", 1


class FileDigests:
    """sha256 of files, cached by (path, size, mtime) in ``<output>/file_digests.json`` (a checkpoint
    of several GB is hashed once)."""

    def __init__(self, path: Path):
        self.path = path
        self.cache = read_json(path) or {}

    def __call__(self, file: Path) -> str:
        st = file.stat()
        key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.cache:
            from lord_ops.metric_models import file_sha256

            self.cache[key] = file_sha256(file)
            from training.pipeline import write_json_atomic

            write_json_atomic(self.path, self.cache)
        return self.cache[key]


# ----------------------------------------------------------------------------------------------
# images on disk: uint8 [3, H, W] tensors in memory, PNG files in the stage folders


def load_set(folder: Path, resolution: int) -> dict:
    """``{stem: uint8 [3, H, W]}`` of the images in ``folder``; images not ``resolution`` squared are
    resized + centre-cropped (images already that size are kept bit-exact: a protection survives)."""
    from lord_ops.datasets import _resize_center_crop, to_uint8, to_unit

    out = {}
    for item in _load_any(folder):
        image = item.image
        if tuple(image.shape[-2:]) != (resolution, resolution):
            image = to_uint8(_resize_center_crop(to_unit(image), resolution))
        if item.path.stem in out:
            raise ConfigError(f"{folder}: two images share the name {item.path.stem!r}; rename one")
        out[item.path.stem] = image
    return out


def _load_any(folder: Path):
    """Images of any size (``load_caption_folder`` insists on one size)."""
    import torch

    from lord_ops.datasets import CaptionedImage, DatasetError, image_files
    from lord_ops.images import load_image

    items = []
    for path in image_files(folder):
        try:
            rgb = load_image(path)[0]
        except Exception as e:  # noqa: BLE001
            raise DatasetError(path, f"cannot be read as an image ({type(e).__name__}: {e})", "replace or remove it") from e
        items.append(CaptionedImage(path, torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), ""))
    return items


def save_png(path: Path, image_chw_u8) -> None:
    import numpy as np
    from PIL import Image

    from lord_ops.atomic import atomic_write

    image = Image.fromarray(np.ascontiguousarray(image_chw_u8.permute(1, 2, 0).numpy()))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_png(path: Path):
    import torch

    from lord_ops.images import load_image

    return torch.from_numpy(load_image(path)[0]).permute(2, 0, 1).contiguous()


def hwc(images_chw: list):
    """list of uint8 [3, H, W] -> uint8 [N, H, W, 3]."""
    import torch

    return torch.stack([im.permute(1, 2, 0) for im in images_chw])


# ----------------------------------------------------------------------------------------------


class Runtime:
    """What stages share in one process: the loaded checkpoint, encoded prompts, metric networks."""

    def __init__(self, exp: Experiment, log):
        self.exp, self.log = exp, log
        self._models = None
        self._metric_models: dict = {}

    def models(self):
        if self._models is None:
            from lord_ops.comfy.bootstrap import load_checkpoint_models

            t0 = time.time()
            self._models = load_checkpoint_models(self.exp.checkpoint)
            self.log(f"loaded {self.exp.checkpoint.name} in {time.time() - t0:.1f} s")
        return self._models

    def encode(self, text: str):
        from lord_ops.comfy.generate import encode_prompt

        return encode_prompt(self.models()[1], text)

    def metric_model(self, kind: str):
        if kind not in self._metric_models:
            from lord_ops import metric_models as mm

            m = self.exp.metrics
            if kind == "clip_iqa":
                self._metric_models[kind] = mm.load_clip_iqa(m.clip_iqa_model, m.clip_iqa_weights, device=_device())
            elif kind == "inception":
                self._metric_models[kind] = mm.load_inception(m.inception_weights, m.fid_features, device=_device())
            else:
                self._metric_models[kind] = mm.load_feature_extractor(m.extractor, m.extractor_weights, device=_device())
        return self._metric_models[kind]


def _device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def metric_plan(exp: Experiment) -> dict:
    """Which metrics this run can compute: ``{id: {label, available, ...}}``; missing weights are
    reported as missing, never replaced."""
    m = exp.metrics
    out = {}
    if m.clip_iqa_weights is not None:
        out["clip_iqa"] = {"label": "CLIP-IQA", "available": True, "higher_is_better": True, "backbone": m.clip_iqa_model,
                           "prompts": [f"A good photo of a {exp.class_name}.", f"A bad photo of a {exp.class_name}."]}
    else:
        out["clip_iqa"] = {"label": "CLIP-IQA", "available": False, "higher_is_better": True,
                           "missing": "no CLIP weights: set [metrics] clip_iqa_weights (an open_clip file for "
                                      f"{m.clip_iqa_model!r})"}
    fid_label = "FID" if m.fid_features == 2048 else f"FD (inception-v3 pool {m.fid_features})"
    kid_label = "KID" if m.fid_features == 2048 else f"KD (inception-v3 pool {m.fid_features})"
    if m.inception_weights is not None:
        out["fid"] = {"label": fid_label, "available": True, "higher_is_better": False, "extractor": "inception-v3",
                      "features": m.fid_features}
        out["kid"] = {"label": kid_label, "available": True, "higher_is_better": False, "extractor": "inception-v3"}
    else:
        why = "no Inception weights: set [metrics] inception_weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
        out["fid"] = {"label": fid_label, "available": False, "higher_is_better": False, "missing": why}
        out["kid"] = {"label": kid_label, "available": False, "higher_is_better": False, "missing": why}
    if m.extractor is not None:
        out["fd"] = {"label": f"FD ({m.extractor})", "available": True, "higher_is_better": False, "extractor": m.extractor}
        out["kd"] = {"label": f"KD ({m.extractor})", "available": True, "higher_is_better": False, "extractor": m.extractor}
    if m.subject_class is not None:
        out["subject_acc"] = {"label": f"Subject accuracy ({m.extractor})", "available": True, "higher_is_better": True,
                              "extractor": m.extractor, "subject_class": m.subject_class,
                              "definition": f"share of the generated images that {m.extractor} classifies as "
                                            f"{m.subject_class!r}"}
    return out


@dataclasses.dataclass
class Variant:
    """One Stage-2 run: a mode on a set of training images."""

    mode: str  # plain | pgd2_defense | lord
    images: str  # clean | protected | jpeg | diffpure | mix<k>

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.images}"


class ExperimentRunner:
    """Builds the stage plan of one experiment and assembles its results."""

    def __init__(self, exp: Experiment, log=print, check_metric_weights: bool = True):
        self.exp, self.log = exp, log
        self.rt = Runtime(exp, log)
        self.check_inputs(check_metric_weights)
        exp.output.mkdir(parents=True, exist_ok=True)
        self.digests = FileDigests(exp.output / "file_digests.json")
        self.plan = Plan(exp.output, log)
        self.metrics = metric_plan(exp)
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
        self.variants: dict[str, Variant] = {}
        self.sweep: dict[str, list] = {}
        self.build()

    def check_inputs(self, metric_weights: bool) -> None:
        """What would otherwise fail hours into a run: Stage-1 captions, the LoRD file, the attack
        target and the metric weight files (each loaded once). Raises ConfigError naming the field."""
        exp = self.exp
        where = lambda field: f"{exp.config_path}: {field}"  # noqa: E731
        if exp.stage1_data is not None and exp.stage1_caption is None:
            from lord_ops.datasets import image_files

            for image in image_files(exp.stage1_data):
                caption = image.with_suffix(".txt")
                if not caption.is_file() or not caption.read_text(encoding="utf-8", errors="replace").strip():
                    raise ConfigError(f"{where('[stage1] data')}: {image.name} has no (or an empty) caption file "
                                      f"{caption.name}; add one, or set [stage1] caption for every image")
        if exp.stage1_lord is not None:
            from lord_ops.format import load_lord_file
            from lord_ops.safetensors_file import LoRDFileError

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
            from lord_ops.metric_models import MetricWeightsError

            m = exp.metrics
            for kind, field, given in (("clip_iqa", "clip_iqa_weights", m.clip_iqa_weights),
                                       ("inception", "inception_weights", m.inception_weights),
                                       ("extractor", "extractor_weights", m.extractor_weights)):
                if given is not None:
                    try:
                        self.rt.metric_model(kind)
                    except (MetricWeightsError, ValueError, RuntimeError) as e:
                        raise ConfigError(f"{where('[metrics] ' + field)}: {e}") from e
            if m.subject_class is not None:
                classes = list(getattr(self.rt.metric_model("extractor"), "classes", None) or [])
                if m.subject_class not in classes:
                    raise ConfigError(f"{where('[metrics] subject_class')}: {m.extractor} "
                                      + (f"does not classify {m.subject_class!r}; its classes: {', '.join(classes)}"
                                         if classes else "is a feature extractor without classes (no subject accuracy)"))

    # ---- keys ------------------------------------------------------------------------------
    def image_key(self, images: dict) -> str:
        from lord_ops.datasets import tensor_digest

        return digest({n: tensor_digest(images[n]) for n in sorted(images)})

    def base_key(self) -> dict:
        return {"checkpoint": self.ckpt_sha, "resolution": self.exp.resolution}

    # ---- plan ------------------------------------------------------------------------------
    def build(self) -> None:
        exp, add = self.exp, self.plan.add
        if exp.mode == "protocol":
            add(Stage("protect", {**self.base_key(), "images": self.image_key(self.clean), "attack": self.attack_key()},
                      self.run_protect, describe=f"protect {len(self.names)} image(s) with {exp.attack_preset}"))
        if exp.stage1_lord is None:
            add(Stage("stage1", {**self.base_key(), "data": self.stage1_data_key(),
                                 "config": train_config(exp, "stage1").to_dict()}, self.run_stage1,
                      describe="train the LoRD (Stage 1)"))
        protected_stage = ("protect",) if exp.mode == "protocol" else ()
        if self.clean:
            add(Stage("detect", {**self.base_key(), "lord": self.lord_key(), "clean": self.image_key(self.clean),
                                 "protected": self.protected_key(), "timestep": exp.detection_timestep,
                                 "seed": exp.detection_seed, "prompt": exp.class_text},
                      self.run_detect, needs=self.lord_needs() + protected_stage,
                      describe="LoRD Detect scores, clean vs protected"))
        wanted = [Variant(METHODS[m][1], METHODS[m][2]) for m in exp.methods]
        n = len(self.names)
        for series in exp.sweep_series if exp.sweep_shares else ():
            for share in exp.sweep_shares:
                k = round(share * n)
                images = "clean" if k == 0 else "protected" if k == n else f"mix{k}"
                v = Variant("plain" if series == "plain" else "lord", images)
                self.sweep.setdefault(series, []).append({"share": share, "method": v.id})
                wanted.append(v)
        for purifier in ("jpeg", "diffpure"):
            if any(v.images == purifier for v in wanted):
                add(Stage(f"purify/{purifier}", {**self.base_key(), "protected": self.protected_key(),
                                                 **self.purify_key(purifier)},
                          lambda folder, p=purifier: self.run_purify(folder, p), needs=protected_stage,
                          describe=f"{purifier} purification of the protected images"))
        self.add_reference()
        for v in wanted:
            if v.id in self.variants:
                continue
            self.variants[v.id] = v
            needs = self.set_needs(v.images) + (self.lord_needs() if v.mode == "lord" else ())
            cfg = train_config(exp, "stage2", v.mode)
            add(Stage(f"train/{v.id}", {**self.base_key(), "images": self.set_key(v.images), "prompt": exp.prompt,
                                        "class_images": self.class_key(), "config": cfg.to_dict(),
                                        "lord": self.lord_key() if v.mode == "lord" else None},
                      lambda folder, v=v: self.run_train(folder, v), needs=needs,
                      describe=f"Stage-2 LoRA, mode {v.mode}, on the {v.images} images"))
            add(Stage(f"sample/{v.id}", {"prompt": exp.prompt, "sampling": dataclasses.asdict(exp.sampling)},
                      lambda folder, v=v: self.run_sample(folder, v), needs=(f"train/{v.id}",) + (
                          self.lord_needs() if v.mode == "lord" else ()),
                      describe=f"{exp.sampling.images} image(s) of {exp.prompt!r}"))
            add(Stage(f"score/{v.id}", {"metrics": self.metrics_key()},
                      lambda folder, v=v: self.run_score(folder, v), needs=(f"sample/{v.id}", "reference"),
                      describe="metrics of the samples"))

    def attack_key(self) -> dict:
        exp = self.exp
        return {"preset": exp.attack_preset, "steps": exp.attack_steps, "rounds": exp.attack_rounds, "seed": exp.attack_seed,
                **({"epsilon": exp.attack_epsilon, "step_size": exp.attack_step_size}
                   if exp.attack_epsilon or exp.attack_step_size else {}),
                "target": self.digests(exp.attack_target) if exp.attack_target else None, "prompt": exp.prompt,
                "class_images": self.class_key()}

    def stage1_data_key(self) -> dict:
        from lord_ops.datasets import image_files

        files = image_files(self.exp.stage1_data)
        caps = [f.with_suffix(".txt") for f in files]
        return {"files": {f.name: self.digests(f) for f in files},
                "captions": {c.name: self.digests(c) for c in caps if c.is_file()}, "caption": self.exp.stage1_caption}

    def class_key(self):
        from lord_ops.datasets import image_files

        if self.exp.class_images is None:
            return None
        return {"files": {f.name: self.digests(f) for f in image_files(self.exp.class_images)},
                "prompt": self.exp.class_text}

    def lord_key(self):
        return {"file": self.digests(self.exp.stage1_lord)} if self.exp.stage1_lord else {"stage": "stage1"}

    def lord_needs(self) -> tuple:
        return () if self.exp.stage1_lord else ("stage1",)

    def protected_key(self):
        return self.image_key(self.given_protected) if self.exp.mode == "artist" else {"stage": "protect"}

    def purify_key(self, purifier: str) -> dict:
        exp = self.exp
        if purifier == "jpeg":
            return {"jpeg_quality": exp.jpeg_quality}
        return {"strength": exp.diffpure_strength, "steps": exp.diffpure_steps, "prompt": exp.class_text,
                "seed": exp.seed, "sampler": exp.sampling.sampler, "scheduler": exp.sampling.scheduler,
                "cfg": exp.sampling.cfg, "negative": exp.sampling.negative}

    def set_needs(self, images: str) -> tuple:
        protocol = self.exp.mode == "protocol"
        if images == "clean":
            return ()
        if images in ("jpeg", "diffpure"):
            return (f"purify/{images}",)
        return ("protect",) if protocol else ()

    def set_key(self, images: str):
        if images == "clean":
            return {"clean": self.image_key(self.clean)}
        if images.startswith("mix"):
            return {"clean": self.image_key(self.clean), "protected": self.protected_key(),
                    "protected_names": self.mix_names(int(images[3:]))}
        return {images: self.protected_key() if images == "protected" else {"stage": f"purify/{images}"}}

    def metrics_key(self) -> dict:
        m = self.exp.metrics
        return {"plan": self.metrics, "class": self.exp.class_name,
                "clip_iqa": self.digests(m.clip_iqa_weights) if m.clip_iqa_weights else None,
                "inception": self.digests(m.inception_weights) if m.inception_weights else None,
                "extractor": self.digests(m.extractor_weights) if m.extractor_weights else None,
                "kid": [m.kid_subsets, m.kid_subset_size], "fd_bootstrap": m.fd_bootstrap, "seed": self.exp.seed}

    def add_reference(self) -> None:
        m = self.exp.metrics
        if m.reference is not None:
            ref = {"folder": self.image_key(load_set(m.reference, self.exp.resolution))}
        elif self.clean:
            ref = {"clean_instance_images": self.image_key(self.clean)}
        else:
            ref = None
        self.reference = ref
        self.plan.add(Stage("reference", {"reference": ref, "metrics": self.metrics_key()}, self.run_reference,
                            describe="features of the reference images"))

    def mix_names(self, k: int) -> list:
        """The ``k`` instance images that are protected in a sweep point (a seeded choice)."""
        order = list(self.names)
        random.Random(self.exp.seed).shuffle(order)
        return sorted(order[:k])

    # ---- image sets ------------------------------------------------------------------------
    def protected(self) -> dict:
        if self.exp.mode == "artist":
            return self.given_protected
        folder = self.plan.folder("protect") / "images"
        return {n: read_png(folder / f"{n}.png") for n in self.names}

    def image_set(self, images: str) -> dict:
        if images == "clean":
            return self.clean
        if images == "protected":
            return self.protected()
        if images in ("jpeg", "diffpure"):
            folder = self.plan.folder(f"purify/{images}") / "images"
            return {n: read_png(folder / f"{n}.png") for n in self.names}
        chosen = set(self.mix_names(int(images[3:])))
        prot = self.protected()
        return {n: (prot[n] if n in chosen else self.clean[n]) for n in self.names}

    def lord_path(self) -> Path:
        return self.exp.stage1_lord or (self.plan.folder("stage1") / "lord.safetensors")

    # ---- stages ----------------------------------------------------------------------------
    def run_protect(self, folder: Path) -> dict:
        import torch

        from lord_ops.attacks import check_8bit_budget, preset
        from lord_ops.comfy.protect import protect

        exp = self.exp
        chosen = preset(exp.attack_preset)
        overrides = {k: v for k, v in (("steps", exp.attack_steps), ("epsilon", exp.attack_epsilon),
                                       ("step_size", exp.attack_step_size)) if v}
        attack = dataclasses.replace(chosen.attack, seed=exp.attack_seed, **overrides).validate()
        check_8bit_budget(attack.epsilon, "[attack] epsilon" if exp.attack_epsilon else "[attack] preset")
        surrogate = chosen.surrogate
        if surrogate is not None and exp.attack_rounds:
            surrogate = dataclasses.replace(surrogate, rounds=exp.attack_rounds)
        model, clip, vae = self.rt.models()
        cond = self.rt.encode(exp.prompt)
        target = None
        if exp.attack_target is not None:
            target = self._read_unit(exp.attack_target)
        classes, class_cond = None, None
        if surrogate is not None and exp.class_images is not None:
            classes = [self._unit(im)[None] for im in load_set(exp.class_images, exp.resolution).values()]
            class_cond = self.rt.encode(exp.class_text)
        out = folder / "images"
        todo = [n for n in self.names if not (out / f"{n}.png").is_file()]
        reports = read_json(folder / "reports.json") or {}
        step = [0]

        def progress(done, total, loss, _preview):
            step[0] += 1
            if done == total or step[0] % max(1, total // 10) == 0:
                self.log(f"    protect: step {done}/{total} loss {loss:.4g}")

        if surrogate is not None and todo:  # the published loops attack the set as a whole
            todo = list(self.names)
            images = [self._unit(self.clean[n])[None] for n in todo]
            perturbed, report = protect(model, vae, cond, images, attack, surrogate, target, progress, classes, class_cond)
            for i, n in enumerate(todo):
                save_png(out / f"{n}.png", self._u8(perturbed[i]))
            reports = {"set": {k: v for k, v in report.items() if k != "loss_traces"},
                       "final_loss": [tr[-1] if tr else None for tr in report["loss_traces"]]}
        else:
            for i, n in enumerate(todo):
                one = dataclasses.replace(attack, seed=exp.attack_seed + self.names.index(n))
                perturbed, report = protect(model, vae, cond, self._unit(self.clean[n])[None], one, None, target, progress)
                save_png(out / f"{n}.png", self._u8(perturbed))
                reports[n] = {"final_loss": report["loss_traces"][0][-1] if report["loss_traces"][0] else None}
                from training.pipeline import write_json_atomic

                write_json_atomic(folder / "reports.json", reports)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return {"images": len(self.names), "attack": {"preset": exp.attack_preset, **dataclasses.asdict(attack),
                                                      "surrogate": dataclasses.asdict(surrogate) if surrogate else None,
                                                      "target": str(exp.attack_target) if exp.attack_target else "pattern"}}

    @staticmethod
    def _unit(chw_u8):
        return chw_u8.permute(1, 2, 0).float().div(255)  # [H, W, 3] in 0..1

    @staticmethod
    def _u8(bhwc_or_hwc):
        from lord_ops.datasets import to_uint8

        x = bhwc_or_hwc[0] if bhwc_or_hwc.dim() == 4 else bhwc_or_hwc
        return to_uint8(x.permute(2, 0, 1))

    def _read_unit(self, path: Path):
        im = read_png(path)
        return self._unit(im)[None]

    def run_stage1(self, folder: Path) -> dict:
        from lord_ops.comfy.data import TrainingData
        from lord_ops.comfy.stages import train_stage1
        from lord_ops.datasets import load_caption_folder
        from lord_ops.format import save_lord_file

        exp = self.exp
        config = train_config(exp, "stage1")
        items = load_caption_folder(exp.stage1_data, exp.resolution, exp.stage1_caption)
        model, clip, vae = self.rt.models()
        data = TrainingData([it.image for it in items], [self.rt.encode(it.caption) for it in items],
                            [it.caption for it in items])
        result = train_stage1(model, vae, data, config, folder / "pgd_cache", folder / "checkpoint.pt",
                              on_step=self._on_step("stage1"))
        save_lord_file(folder / "lord.safetensors", result.lord)
        report = {k: v for k, v in result.report.items() if k != "final"}
        return {"lord": "lord.safetensors", "images": len(items), "steps": config.steps,
                "final_loss": result.report["final"]["loss"], **report}

    def _on_step(self, what: str):
        def on_step(rec):
            if rec.step == rec.steps or rec.step % max(1, rec.steps // 10) == 0:
                self.log(f"    {what}: step {rec.step}/{rec.steps} loss {rec.loss:.5f}")
        return on_step

    def lord_model(self, model):
        from lord_ops.comfy.patch import apply_lord
        from lord_ops.format import load_lord_file

        return apply_lord(model, load_lord_file(self.lord_path()))

    def run_detect(self, folder: Path) -> dict:
        from lord_ops.comfy.detection import detect
        from lord_ops.metrics import detection_summary

        exp = self.exp
        model, clip, vae = self.rt.models()
        lord_model = self.lord_model(model)
        cond = self.rt.encode(exp.class_text)
        prot = self.protected()
        scores = {"clean": [], "protected": []}
        for n in self.names:
            for label, images in (("clean", self.clean), ("protected", prot)):
                found = detect(lord_model, vae, self._unit(images[n])[None], cond, exp.detection_timestep, exp.detection_seed)
                scores[label].append(round(float(found.scores[0]), 6))
        return {"names": self.names, "scores_clean": scores["clean"], "scores_protected": scores["protected"],
                "summary": detection_summary(scores["clean"], scores["protected"]),
                "timestep": exp.detection_timestep, "prompt": exp.class_text}

    def run_purify(self, folder: Path, purifier: str) -> dict:
        exp = self.exp
        prot = self.protected()
        out = folder / "images"
        if purifier == "jpeg":
            from lord_ops.purify import jpeg_recompress

            done = jpeg_recompress(hwc([prot[n] for n in self.names]), exp.jpeg_quality)
            for i, n in enumerate(self.names):
                save_png(out / f"{n}.png", done[i].permute(2, 0, 1))
            return {"images": len(self.names), "jpeg_quality": exp.jpeg_quality}
        from lord_ops.comfy.generate import diffpure

        model, clip, vae = self.rt.models()
        cfg = sampling_config(exp, steps=exp.diffpure_steps, batch_size=1)
        for i, n in enumerate(self.names):
            if (out / f"{n}.png").is_file():
                continue
            done = diffpure(model, clip, vae, hwc([prot[n]]), exp.class_text, exp.diffpure_strength, exp.seed + i, cfg)
            save_png(out / f"{n}.png", done[0].permute(2, 0, 1))
            self.log(f"    diffpure: {i + 1}/{len(self.names)}")
        return {"images": len(self.names), "strength": exp.diffpure_strength, "steps": exp.diffpure_steps,
                "prompt": exp.class_text}

    def run_train(self, folder: Path, v: Variant) -> dict:
        from lord_ops.comfy.data import TrainingData
        from lord_ops.comfy.kohya import kohya_metadata
        from lord_ops.comfy.patch import model_family
        from lord_ops.comfy.stages import train_stage2
        from lord_ops.format import save_kohya_lora

        exp = self.exp
        config = train_config(exp, "stage2", v.mode)
        images = self.image_set(v.images)
        model, clip, vae = self.rt.models()
        if v.mode == "lord":
            model = self.lord_model(model)
        cond = self.rt.encode(exp.prompt)
        class_images, class_conds = [], []
        if exp.class_images is not None:
            class_images = list(load_set(exp.class_images, exp.resolution).values())
            class_conds = [self.rt.encode(exp.class_text)] * len(class_images)
        data = TrainingData([images[n] for n in self.names], [cond] * len(self.names), [exp.prompt] * len(self.names),
                            class_images, class_conds)
        result = train_stage2(model, vae, data, config, folder / "pgd_cache", folder / "checkpoint.pt",
                              on_step=self._on_step(f"train {v.id}"))
        save_kohya_lora(folder / "lora.safetensors", result.lora, kohya_metadata(config, model_family(model), result.report))
        return {"lora": "lora.safetensors", "mode": v.mode, "images": v.images, "steps": config.steps,
                "final_loss": result.report["final"]["loss"]}

    def run_sample(self, folder: Path, v: Variant) -> dict:
        from lord_ops.comfy.generate import text_to_image
        from lord_ops.comfy.patch import load_lora_for_model

        import comfy.sd

        exp, s = self.exp, self.exp.sampling
        model, clip, vae = self.rt.models()
        if v.mode == "lord":
            model = self.lord_model(model)
        lora = load_lora_for_model(model, self.plan.folder(f"train/{v.id}") / "lora.safetensors")
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
        cfg = sampling_config(exp)
        out = folder / "images"
        todo = [i for i in range(s.images) if not (out / f"{i:04d}.png").is_file()]
        if todo:
            if len(todo) < s.images:
                self.log(f"    sample {v.id}: {s.images - len(todo)} image(s) already written, {len(todo)} to go")

            def on_image(j, image_u8):
                save_png(out / f"{todo[j]:04d}.png", image_u8.permute(2, 0, 1))
                if (j + 1) % max(1, len(todo) // 10) == 0 or j + 1 == len(todo):
                    self.log(f"    sample {v.id}: {j + 1}/{len(todo)}")

            text_to_image(model, clip, vae, exp.prompt, [s.seed + i for i in todo], cfg, on_image=on_image)
        return {"images": [f"images/{i:04d}.png" for i in range(s.images)], "seeds": [s.seed + i for i in range(s.images)]}

    def reference_images(self):
        m = self.exp.metrics
        images = load_set(m.reference, self.exp.resolution) if m.reference is not None else self.clean
        return hwc([images[n] for n in sorted(images)])

    def run_reference(self, folder: Path) -> dict:
        from safetensors.torch import save_file

        out = {}
        if self.reference is None:
            return {"images": 0, "note": "no clean reference images (artist mode without originals and no "
                                         "[metrics] reference): FID/KID/FD are not computed"}
        images = self.reference_images()
        tensors = {}
        for kind, metric in (("inception", "fid"), ("extractor", "fd")):
            if metric in self.metrics and self.metrics[metric]["available"]:
                tensors[kind] = self.rt.metric_model(kind).features(images, self.exp.metrics.batch_size).contiguous()
                out[kind] = list(tensors[kind].shape)
        if tensors:
            from lord_ops.atomic import atomic_write

            atomic_write(folder / "features.safetensors", lambda tmp: save_file(tensors, tmp))
        return {"images": int(images.shape[0]), "features": out}

    def run_score(self, folder: Path, v: Variant) -> dict:
        import numpy as np
        import torch
        from safetensors.torch import load_file

        from lord_ops.metrics import frechet_distance, kernel_distance

        exp, m = self.exp, self.exp.metrics
        sample_dir = self.plan.folder(f"sample/{v.id}")
        files = self.plan.result(f"sample/{v.id}")["images"]
        images = hwc([read_png(sample_dir / f) for f in files])
        out = {}
        if self.metrics["clip_iqa"]["available"]:
            s = self.rt.metric_model("clip_iqa").score(images, exp.class_name, m.batch_size)
            out["clip_iqa"] = {"mean": float(s.mean()), "std": float(s.std(unbiased=False)),
                               "per_image": [round(float(x), 6) for x in s]}
        ref_file = self.plan.folder("reference") / "features.safetensors"
        ref = load_file(str(ref_file)) if ref_file.is_file() else {}
        for kind, fd, kd in (("inception", "fid", "kid"), ("extractor", "fd", "kd")):
            if kind not in ref:
                continue
            feats = self.rt.metric_model(kind).features(images, m.batch_size)
            out[fd] = {"value": float(frechet_distance(feats, ref[kind])), "images": int(feats.shape[0]),
                       "reference_images": int(ref[kind].shape[0])}
            if m.fd_bootstrap:  # FID at ~100 images is noisy: its spread over resampled generated sets
                rng = np.random.RandomState(exp.seed)
                boot = [frechet_distance(feats[torch.from_numpy(rng.randint(0, len(feats), len(feats)))], ref[kind])
                        for _ in range(m.fd_bootstrap)]
                out[fd].update(std=float(np.std(boot)), std_kind=f"bootstrap over the generated images "
                                                                 f"({m.fd_bootstrap} resamples)")
            kid = kernel_distance(feats, ref[kind], m.kid_subsets, m.kid_subset_size, exp.seed)
            out[kd] = {k: (float(val) if isinstance(val, float) else val) for k, val in kid.items()}
        if "subject_acc" in self.metrics:
            model = self.rt.metric_model("extractor")
            predicted = model.predict(images, m.batch_size)
            hits = (predicted == model.classes.index(m.subject_class)).double()
            out["subject_acc"] = {"mean": float(hits.mean()), "std": float(hits.std(unbiased=False)),
                                  "per_image": [int(h) for h in hits],
                                  "predicted": {c: int((predicted == i).sum()) for i, c in enumerate(model.classes)
                                                if int((predicted == i).sum())}}
        return out

    # ---- results ---------------------------------------------------------------------------
    def stage_names(self, patterns) -> list[str]:
        chosen = [n for n in self.plan.stages if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not chosen:
            raise ConfigError(f"--only {','.join(patterns)} matches no stage; stages: {', '.join(self.plan.stages)}")
        return chosen

    def results(self, report_dir: Path) -> dict:
        import os

        exp = self.exp
        rel = lambda p: os.path.relpath(p, report_dir)  # noqa: E731
        methods = {}
        for row, m in enumerate(exp.methods):
            label, mode, images = METHODS[m]
            vid = Variant(mode, images).id
            sample = self.plan.result(f"sample/{vid}")
            methods[m] = {"label": label, "row": row, "id": vid, "stage2_mode": mode, "lord": mode == "lord",
                          "trained_on": {"jpeg": "jpeg(protected)", "diffpure": "diffpure(protected)"}.get(images, images),
                          "samples": [rel(self.plan.folder(f"sample/{vid}") / f) for f in sample["images"]],
                          "metrics": self.plan.result(f"score/{vid}"),
                          "train": self.plan.result(f"train/{vid}")}
        if "clean" in methods and "attacking" in methods:
            for m, entry in methods.items():
                if m not in ("clean", "attacking"):
                    entry["recovered"], skipped = damage_undone(methods["clean"]["metrics"],
                                                                methods["attacking"]["metrics"], entry["metrics"])
                    if skipped:
                        entry["recovered_skipped"] = skipped
        sweep = None
        if self.sweep:
            sweep = {"shares": list(exp.sweep_shares), "labels": dict(SWEEP_SERIES),
                     "series": {s: [{**p, "metrics": self.plan.result(f"score/{p['method']}")} for p in points]
                                for s, points in self.sweep.items()}}
        detection = {"available": False, "missing": "needs the clean originals ([subject] instance_images)"}
        if "detect" in self.plan.stages:
            d = self.plan.result("detect")
            detection = {"available": True, "attack": exp.attack_preset if exp.mode == "protocol" else "given",
                         "summary": d["summary"], "scores_clean": d["scores_clean"],
                         "scores_protected": d["scores_protected"], "names": d["names"], "timestep": d["timestep"]}
        perturbation = None
        if self.clean:
            from lord_ops.metrics import perturbation_stats

            prot = self.protected()
            per = [{"name": n, **perturbation_stats(self.clean[n].permute(1, 2, 0), prot[n].permute(1, 2, 0))}
                   for n in self.names]
            keys = [k for k in per[0] if k != "name"] if per else []
            perturbation = {"attack": self.plan.result("protect")["attack"] if exp.mode == "protocol" else "given",
                            "per_image": per,
                            "mean": {k: float(sum(p[k] for p in per) / len(per)) for k in keys}}
        metrics = {k: v for k, v in self.metrics.items()}
        for k, v in metrics.items():
            if k in ("clip_iqa",) and v["available"]:
                v["weights"] = {"path": str(exp.metrics.clip_iqa_weights), "sha256": self.digests(exp.metrics.clip_iqa_weights)}
            if k in ("fid", "kid") and v["available"]:
                v["weights"] = {"path": str(exp.metrics.inception_weights), "sha256": self.digests(exp.metrics.inception_weights)}
            if k in ("fd", "kd"):
                v["weights"] = {"path": str(exp.metrics.extractor_weights), "sha256": self.digests(exp.metrics.extractor_weights)}
        return {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "mode": exp.mode,
                "subject": {"class_name": exp.class_name, "instance_prompt": exp.prompt, "instance_images": len(self.names),
                            "paper_dataset": exp.paper_dataset, "resolution": exp.resolution},
                "metrics": metrics, "methods": methods, "sweep": sweep, "detection": detection,
                "perturbation": perturbation, "provenance": self.provenance(),
                "recovered_definition": "share of the Clean-Attacking gap a method closes, per metric: "
                                        "(method - attacking) / (clean - attacking); 100% = as good as training "
                                        "on the clean images, 0% = no better than training on the protected ones. "
                                        "Computed only where the gap exceeds twice its noise (CLIP-IQA: standard "
                                        "error over the images; KID: spread over subsets; FID/FD: bootstrap over "
                                        "the generated images)"}

    def provenance(self) -> dict:
        exp = self.exp
        stage1 = self.plan.result("stage1") if "stage1" in self.plan.stages else {
            "lord": str(exp.stage1_lord), "sha256": self.digests(exp.stage1_lord)}
        return {"checkpoint": {"path": str(exp.checkpoint), "sha256": self.ckpt_sha}, "versions": versions(),
                "config": _jsonable(dataclasses.asdict(exp)), "seeds": {
                    "experiment": exp.seed, "attack": exp.attack_seed, "sampling": exp.sampling.seed,
                    "detection": exp.detection_seed, "stage1": train_config(exp, "stage1").seed,
                    "stage2": train_config(exp, "stage2").seed},
                "attack": self.plan.result("protect")["attack"] if exp.mode == "protocol" else {
                    "given": str(exp.protected_images)},
                "stage1": stage1, "stages": {n: self.plan.full_digest(n) for n in self.plan.stages}}


def damage_undone(clean: dict, attacking: dict, method: dict) -> tuple[dict, dict]:
    """Per metric, the share of the Clean-Attacking gap that ``method`` closes:
    ``(method - attacking) / (clean - attacking)`` (1 = as good as Clean, 0 = no better than
    Attacking), only where the gap exceeds twice its noise (:func:`_spread` of both rows); the
    skipped metrics come back with the reason. Arguments: ``{metric: score entry}`` of each row."""
    recovered, skipped = {}, {}
    for metric, entry in method.items():
        c, a, x = (_headline(row.get(metric)) for row in (clean, attacking, method))
        if None in (c, a, x):
            continue
        gap, noise = c - a, math.hypot(_spread(clean[metric]), _spread(attacking[metric]))
        if abs(gap) > 2 * noise and abs(gap) > 1e-12:
            recovered[metric] = (x - a) / gap
        else:
            skipped[metric] = (f"Clean-Attacking gap {gap:.4g} is within twice its noise ({noise:.4g}): "
                               f"the attack did not measurably change this metric")
    return recovered, skipped


def _spread(entry: dict) -> float:
    """Noise of a method's headline number: the standard error over images for per-image metrics,
    else the reported spread (KID subsets, FD bootstrap), else 0."""
    if entry.get("per_image"):
        return float(entry.get("std", 0.0)) / math.sqrt(len(entry["per_image"]))
    return float(entry.get("std", 0.0) or 0.0)


def _headline(entry):
    if not entry:
        return None
    for k in ("mean", "value"):
        if k in entry:
            return float(entry[k])
    return None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def versions() -> dict:
    import platform

    import torch

    from lord_ops import tool_version

    out = {"comfyui_lord": tool_version(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import comfyui_version

        out["comfyui"] = comfyui_version.__version__
    except ImportError:
        out["comfyui"] = "unknown"
    for name in ("open_clip", "torch_fidelity"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            out[name] = "not installed"
    return out


def sampling_config(exp: Experiment, steps: Optional[int] = None, batch_size: Optional[int] = None):
    """The generation settings as ComfyUI's sampler takes them (``lord_ops.comfy.generate``), checked
    against this ComfyUI (sampler/scheduler names): a problem becomes a ConfigError naming the field."""
    from lord_ops.comfy.generate import SamplingConfig

    s = exp.sampling
    try:
        return SamplingConfig(steps=steps or s.steps, cfg=s.cfg, sampler=s.sampler, scheduler=s.scheduler,
                              width=exp.resolution, height=exp.resolution, batch_size=batch_size or s.batch_size,
                              negative=s.negative).validate()
    except ValueError as e:
        field = str(e).split(":", 1)[0].replace("SamplingConfig.", "")
        raise ConfigError(f"{exp.config_path}: [sampling] {field}: {str(e).split(':', 1)[-1].strip()}") from e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="the experiment's TOML file (see docs/experiment.md)")
    ap.add_argument("--output", help="override [experiment] output")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run only the stages matching these glob patterns (and what they need), e.g. 'train/lord-*'; "
                         "comma-separated or repeated. Without --report the report is not written")
    ap.add_argument("--report", action="store_true", help="with --only: also write the report (all stages must be done)")
    ap.add_argument("--list", action="store_true", help="print the stages and their state, then exit")
    ap.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, parent custom_nodes, pinned copy)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    args = ap.parse_args(argv)

    from lord_ops.comfy.bootstrap import ComfyUINotFound, Refused, ensure_comfyui_importable, find_comfyui

    log = lambda text: print(f"[experiment] {text}", flush=True)  # noqa: E731
    try:
        exp = load_config(args.config, args.output)
        find_comfyui(args.comfyui)
        ensure_comfyui_importable(args.comfyui, cpu=True if args.cpu else None)
        sampling_config(exp)
        runner = ExperimentRunner(exp, log, check_metric_weights=not args.list)
        patterns = [p for item in args.only for p in item.split(",") if p]
        only = runner.stage_names(patterns) if patterns else None
    except (ConfigError, Refused, ComfyUINotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for name, state in runner.plan.status():
            needs = runner.plan.stages[name].needs
            print(f"{state:8s} {name}" + (f"  (needs {', '.join(needs)})" if needs else ""))
        return 0
    t0 = time.time()
    log(f"{len(runner.plan.stages)} stage(s) -> {exp.output}")
    try:
        runner.plan.run(only)
        if only is None or args.report:
            from training.report import write_report

            report_dir = exp.output / "report"
            files = write_report(runner.results(report_dir), report_dir)
            log(f"report: {report_dir / 'index.html'} ({len(files)} file(s))")
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command to continue", file=sys.stderr)
        return 130
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (finished stages are kept; fix it and run the same command)", file=sys.stderr)
        return 1
    from training.pipeline import write_json_atomic

    write_json_atomic(exp.output / "timings.json", {"ran": runner.plan.ran, "seconds": runner.plan.timings,
                                                   "total_s": round(time.time() - t0, 2)})
    total = len(runner.plan.closure(only if only is not None else list(runner.plan.stages)))
    log(f"done in {time.time() - t0:.1f} s ({len(runner.plan.ran)} stage(s) computed, {total - len(runner.plan.ran)} cached)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
