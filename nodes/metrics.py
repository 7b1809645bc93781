"""Image metrics: CLIP-IQA per image, and FID/KID (or FD/KD on another extractor) of a generated batch
against a folder of reference images. Weight files live in ``models/lord_metrics``."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..lord_ops import metric_models as MM
from ..lord_ops.comfy import metrics as CM
from ..lord_ops.images import image_to_uint8
from ..lord_ops.metrics import frechet_distance, kernel_distance


def _fingerprint(weights: str):
    import os

    import folder_paths

    try:
        path = folder_paths.get_full_path(CM.METRICS_FOLDER, weights) if weights else None
    except KeyError:
        return None
    if not path or not os.path.exists(path):
        return None
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


class LoRDImageQuality(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRDImageQuality",
            display_name="LoRD Image Quality (CLIP-IQA)",
            category="LoRD/metrics",
            is_output_node=True,
            description="CLIP-IQA as the LoRD paper uses it: per image, P(good) from a softmax over the CLIP "
                        "similarities to 'A good photo of a {class}.' and 'A bad photo of a {class}.' "
                        "(0..1, higher is better). CLIP weights come from a file in models/lord_metrics.",
            inputs=[
                io.Image.Input("image", tooltip="Images to score."),
                io.String.Input("clip_model", default="RN50-quickgelu",
                                tooltip="open_clip model name. OpenAI's CLIP weights need the -quickgelu variant "
                                        "(RN50-quickgelu, ViT-B-32-quickgelu)."),
                io.Combo.Input("weights", options=CM.metric_weight_files(),
                               tooltip="The open_clip checkpoint of that model (e.g. open_clip_model.safetensors "
                                       "from timm/resnet50_clip.openai), in models/lord_metrics."),
                io.String.Input("class_name", default="person", tooltip="The {class} in the two prompts."),
            ],
            outputs=[
                io.Float.Output(display_name="score", tooltip="Mean CLIP-IQA P(good) over the batch (0..1)."),
                io.String.Output(display_name="report", tooltip="JSON: per-image scores, prompts, backbone and weights (sha256)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, weights=None, **_):
        return _fingerprint(weights)

    @classmethod
    def execute(cls, image, clip_model, weights, class_name):
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        path = CM.metric_weights_path(weights, f"an open_clip checkpoint for '{clip_model}' ({MM.CLIP_EXPECTED})")
        iqa = CM.cached("clip_iqa", clip_model, path, lambda: MM.load_clip_iqa(clip_model, path))
        images = image_to_uint8(image)
        progress = CM.ImageProgress(len(images))
        scores = iqa.score(images, class_name, device=comfy.model_management.get_torch_device(), progress=progress.part(0))
        per_image = [round(float(s), 6) for s in scores]
        mean = float(scores.mean())
        report = {"metric": "CLIP-IQA", "higher_is_better": True, "backbone": iqa.backbone, "weights": iqa.weights,
                  "prompts": list(iqa.prompts(class_name)), "logit_scale": iqa.logit_scale,
                  "mean": round(mean, 6), "std": round(float(scores.std(unbiased=False)), 6), "per_image": per_image}
        text = (f"CLIP-IQA ({iqa.backbone}) P(good), class '{class_name.strip()}': mean {mean:.4f}\n"
                + "\n".join(f"#{i}: {s:.4f}" for i, s in enumerate(per_image)))
        return io.NodeOutput(mean, json.dumps(report), ui=ui.PreviewText(text))


class LoRDImageMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRDImageMetrics",
            display_name="LoRD Image Metrics (FID / KID)",
            category="LoRD/metrics",
            is_output_node=True,
            description="Compare generated images with a folder of reference images: FID and KID with the "
                        "Inception-v3 FID weights, or FD/KD (Frechet / kernel distance) with another feature "
                        "extractor such as clip:<open_clip model>. Lower is better.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images (a batch)."),
                io.String.Input("reference_folder", default="",
                                tooltip="Folder of reference images: an absolute path or a folder inside ComfyUI's input folder."),
                io.String.Input("extractor", default=MM.INCEPTION_NAME,
                                tooltip="inception-v3 (FID/KID; pool features 2048) or clip:<open_clip model>, "
                                        "e.g. clip:RN50-quickgelu (reported as FD/KD, never FID)."),
                io.Combo.Input("weights", options=CM.metric_weight_files(),
                               tooltip="Weights of the extractor in models/lord_metrics: pytorch-fid's "
                                       "pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's file) for inception-v3."),
                io.Int.Input("kid_subset_size", default=1000, min=2, max=100000,
                             tooltip="Samples per KID subset (capped at the smaller image count)."),
                io.Int.Input("kid_subsets", default=100, min=1, max=10000, tooltip="Random subsets averaged for KID."),
            ],
            outputs=[
                io.Float.Output(display_name="fd", tooltip="FID (or FD with another extractor); lower is better."),
                io.Float.Output(display_name="kid", tooltip="KID (or KD) mean; lower is better."),
                io.Float.Output(display_name="kid_std", tooltip="Standard deviation of KID over the subsets."),
                io.String.Output(display_name="report", tooltip="JSON with labels, values, image counts and weights (sha256)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, reference_folder="", weights=None, **_):
        """Re-run when the weights or the reference folder's files change."""
        import os

        try:
            folder = CM.resolve_folder(reference_folder)
            listing = tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in sorted(os.scandir(folder), key=lambda e: e.name))
        except (ValueError, OSError):
            listing = None
        return (_fingerprint(weights), listing)

    @classmethod
    def execute(cls, images, reference_folder, extractor, weights, kid_subset_size=1000, kid_subsets=100):
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        extractor = extractor.strip()
        folder = CM.resolve_folder(reference_folder)
        expected = MM.INCEPTION_EXPECTED if extractor == MM.INCEPTION_NAME else f"the weights of feature extractor '{extractor}'"
        path = CM.metric_weights_path(weights, expected)
        fx = CM.cached("features", extractor, path, lambda: MM.load_feature_extractor(extractor, path))
        reference, names = CM.load_reference_images(folder)
        generated = image_to_uint8(images)
        if len(generated) < 2 or len(reference) < 2:
            raise ValueError(f"{fx.label} needs at least 2 generated and 2 reference images "
                             f"(got {len(generated)} generated, {len(reference)} in {folder})")
        device = comfy.model_management.get_torch_device()
        progress = CM.ImageProgress(len(generated) + len(reference))
        f_gen = fx.features(generated, device=device, progress=progress.part(0))
        f_ref = fx.features(reference, device=device, progress=progress.part(len(generated)))
        fd = frechet_distance(f_gen, f_ref)
        kd = kernel_distance(f_gen, f_ref, subsets=kid_subsets, subset_size=kid_subset_size, seed=0)
        report = {"fd": {"label": fx.label, "value": fd, "higher_is_better": False},
                  "kid": {"label": fx.kid_label, **kd, "higher_is_better": False},
                  "extractor": fx.name, "weights": fx.weights, "generated": len(generated),
                  "reference": {"folder": str(folder), "images": len(reference)}}
        text = (f"{fx.label}: {fd:.4f}\n{fx.kid_label}: {kd['mean']:.6f} ± {kd['std']:.6f} "
                f"({kd['subsets']} subsets of {kd['subset_size']})\n"
                f"{len(generated)} generated vs {len(reference)} reference images ({folder})")
        return io.NodeOutput(fd, kd["mean"], kd["std"], json.dumps(report), ui=ui.PreviewText(text))
