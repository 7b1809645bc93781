"""The lab classifier (issue 11): a small CNN trained on Fashion-MNIST (all 10 classes) that serves
the evaluation as the feature extractor "lab-classifier" ("FD (lab-classifier)", never FID) and
measures **subject accuracy** (the share of generated ``sks`` images it assigns to the held-out
class). Plain torch; weights from a safetensors file.

Input: uint8 ``[N, H, W, 3]`` images of any size; they are turned grey (channel mean) for lab model 1
(or kept RGB), resized to the classifier's size (bilinear, antialiased) and scaled to [-1, 1].

Geometry (:class:`Geometry`): lab model 1's classifier is grey, 32 px, Fashion-MNIST's 10 classes
(the default); lab model 2's is RGB, 64 px, the texture categories (``lab/textures.py``). A weights
file stores its geometry as JSON in the safetensors metadata key ``lab_classifier_geometry``; a file
without it is lab model 1's.
"""
from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F

from .metric_models import register_feature_extractor
from .weights import MetricWeightsError, file_sha256

FEATURES = 128
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CLASSES = len(CLASS_NAMES)  # Fashion-MNIST's label order


GEOMETRY_KEY = "lab_classifier_geometry"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a lab classifier sees: ``channels`` (1: grey, 3: RGB), ``size`` (px, square), ``classes`` (names)."""

    channels: int = 1
    size: int = 32
    classes: tuple = CLASS_NAMES

    def to_json(self) -> str:
        return json.dumps({"channels": self.channels, "size": self.size, "classes": list(self.classes)})

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> "Geometry":
        if not metadata or GEOMETRY_KEY not in metadata:
            return cls()
        d = json.loads(metadata[GEOMETRY_KEY])
        return cls(int(d["channels"]), int(d["size"]), tuple(d["classes"]))


class LabClassifier(torch.nn.Module):
    """Three conv blocks (the first two halve the size) -> global average -> 128-d features -> classes.
    Its input is :meth:`prepare`'s ``[N, channels, size, size]`` in [-1, 1]."""

    def __init__(self, geometry: Geometry = Geometry()):
        super().__init__()
        self.geometry = geometry
        c = torch.nn.Conv2d
        self.body = torch.nn.Sequential(
            c(geometry.channels, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
            c(32, 64, 3, padding=1), torch.nn.GroupNorm(8, 64), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
            c(64, FEATURES, 3, padding=1), torch.nn.GroupNorm(8, FEATURES), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(FEATURES, len(geometry.classes))

    def prepare(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` (0..255) -> ``[N, channels, size, size]`` in [-1, 1]."""
        x = images_u8.float()
        if self.geometry.channels == 1:
            x = x.mean(dim=-1, keepdim=True)
        x = x.permute(0, 3, 1, 2) / 127.5 - 1
        size = self.geometry.size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats, self.head(feats)


class LabClassifierFeatures:
    """The feature-extractor protocol of ``lord_ops.metric_models`` plus ``predict`` (class ids)."""

    def __init__(self, model: LabClassifier, weights: dict):
        self.model, self.weights = model.eval().requires_grad_(False), weights
        self.name = "lab-classifier"
        self.classes = list(model.geometry.classes)
        self.dims = FEATURES
        self.label, self.kid_label = "FD (lab-classifier)", "KD (lab-classifier)"

    def _run(self, images_u8, batch_size, device):
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.model.to(dev)
        feats, logits = [], []
        try:
            with torch.inference_mode():
                for i in range(0, len(images_u8), max(1, int(batch_size))):
                    f, lg = self.model(self.model.prepare(images_u8[i:i + batch_size]).to(dev))
                    feats.append(f.double().cpu())
                    logits.append(lg.float().cpu())
        finally:
            self.model.to("cpu")
        return torch.cat(feats), torch.cat(logits)

    def features(self, images_u8, batch_size: int = 64, device=None, progress=None) -> torch.Tensor:
        out = self._run(images_u8, batch_size, device)[0]
        if progress is not None:
            progress(len(out), len(out))
        return out

    def predict(self, images_u8, batch_size: int = 64, device=None) -> torch.Tensor:
        return self._run(images_u8, batch_size, device)[1].argmax(dim=1)


def load_lab_classifier(name: str, weights_path, device=None, **_options) -> LabClassifierFeatures:
    """The lab classifier from its safetensors weights (``lab/weights/lab_classifier.safetensors``), as
    the feature extractor "lab-classifier"; :class:`MetricWeightsError` when the file is not those weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(weights_path), "pt") as f:
            geometry = Geometry.from_metadata(f.metadata())
        model = LabClassifier(geometry)
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as e:  # noqa: BLE001 -- safetensors/torch raise several types
        raise MetricWeightsError(f"{weights_path} is not the lab classifier's weights ({type(e).__name__}: {e}); "
                                 f"expected the lab_classifier.safetensors shipped beside the lab model") from e
    return LabClassifierFeatures(model, {"path": str(weights_path), "sha256": file_sha256(weights_path)})


register_feature_extractor("lab-classifier", load_lab_classifier)
