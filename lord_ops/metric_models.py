"""Metric networks loaded from user-supplied files (never a download): Inception-v3 for FID/KID
(torch-fidelity's network), open_clip models for CLIP-IQA and for a CLIP Frechet distance.

Images come in as ``uint8`` pixel levels 0..255, ``[N, H, W, 3]`` (a tensor, or a list of
``[H, W, 3]`` tensors of any sizes); features go out as ``[N, D]`` float64 on the CPU.

Names: only Inception-v3 pool features at 2048 dimensions give "FID"/"KID"; every other extractor
or layer is reported as "FD (<extractor>)" / "KD (<extractor>)".
"""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

import torch

from .metrics import clip_iqa_from_features
from .weights import MetricWeightsError, existing_file, file_sha256, first_line, read_state_dict

INCEPTION_NAME = "inception-v3"
INCEPTION_LAYERS = (64, 192, 768, 2048)
INCEPTION_EXPECTED = ("the Inception-v3 FID weights: pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) "
                      "or weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release), "
                      "or the same tensors saved as .safetensors")
CLIP_EXPECTED = ("an open_clip checkpoint of that model (open_clip_model.safetensors or open_clip_pytorch_model.bin "
                 "from the model's Hugging Face page, e.g. timm/resnet50_clip.openai for RN50-quickgelu; "
                 "OpenAI's TorchScript .pt files are not accepted)")
GOOD_PROMPT = "A good photo of a {}."
BAD_PROMPT = "A bad photo of a {}."

Progress = Optional[Callable[[int, int], None]]
ImagesU8 = Union[torch.Tensor, Sequence[torch.Tensor]]


def _weights_info(path: Path) -> dict:
    return {"path": str(path), "sha256": file_sha256(path)}


def _as_image_list(images_u8: ImagesU8) -> list[torch.Tensor]:
    if torch.is_tensor(images_u8):
        if images_u8.dim() == 3:
            images_u8 = images_u8[None]
        items = list(images_u8)
    else:
        items = [torch.as_tensor(im) for im in images_u8]
    if not items:
        raise ValueError("no images given")
    for i, im in enumerate(items):
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[-1] != 3:
            raise ValueError(f"image {i}: expected uint8 pixel levels [H, W, 3], got {im.dtype} {tuple(im.shape)}")
    return items


def _batches(items: list[torch.Tensor], batch_size: int):
    """Consecutive runs of same-size images, at most ``batch_size`` each: (start, [B, H, W, 3])."""
    batch_size = max(1, int(batch_size))
    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and end - start < batch_size and items[end].shape == items[start].shape:
            end += 1
        yield start, torch.stack(items[start:end])
        start = end


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


# ---------------------------------------------------------------- feature extractors

class FeatureExtractor(Protocol):
    """What the FD/KD code needs from a feature extractor."""

    name: str          # "inception-v3" | "clip:RN50" | ...
    label: str         # "FID" (Inception-v3, 2048 features) or f"FD ({name})"
    kid_label: str     # "KID" or f"KD ({name})"
    weights: dict      # {"path", "sha256"}

    def features(self, images_u8: ImagesU8, batch_size: int = 16, device=None,
                 progress: Progress = None) -> torch.Tensor: ...


def _distance_labels(name: str, is_fid: bool) -> tuple[str, str]:
    return ("FID", "KID") if is_fid else (f"FD ({name})", f"KD ({name})")


class InceptionFeatures:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-FID port: 299x299 TF1-style bilinear
    resize inside the network) on one pool layer."""

    def __init__(self, module, layer: int, weights: dict):
        self.module, self.layer, self.weights = module, int(layer), weights
        self.name = INCEPTION_NAME
        self.dims = int(layer)
        shown = INCEPTION_NAME if self.layer == 2048 else f"{INCEPTION_NAME} pool {self.layer}"
        self.label, self.kid_label = _distance_labels(shown, self.layer == 2048)

    def features(self, images_u8: ImagesU8, batch_size: int = 16, device=None, progress: Progress = None) -> torch.Tensor:
        """``[N, layer]`` float64 CPU features of uint8 images (any size; each batch groups same-size images)."""
        items = _as_image_list(images_u8)
        dev = _device(device)
        out = []
        self.module.to(dev)
        try:
            with torch.inference_mode():
                for start, batch in _batches(items, batch_size):
                    (f,) = self.module(batch.permute(0, 3, 1, 2).contiguous().to(dev))
                    out.append(f.double().cpu())
                    if progress is not None:
                        progress(start + len(batch), len(items))
        finally:
            self.module.to("cpu")
        return torch.cat(out) if out else torch.zeros(0, self.dims, dtype=torch.float64)


def _inception_module(sd: dict[str, torch.Tensor], layer: int):
    """torch-fidelity's Inception-v3 loaded from a private temporary ``.pth`` holding exactly the checked
    tensors (torch-fidelity unpickles its file with ``weights_only=False``, so it never reads the
    user's file itself; the copy is created exclusively, 0600, and removed right after loading)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fd, tmp = tempfile.mkstemp(prefix="lord-inception-", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({k: v.contiguous() for k, v in sd.items()}, f)
        return FeatureExtractorInceptionV3(INCEPTION_NAME, [str(int(layer))], feature_extractor_weights_path=tmp)
    finally:
        os.remove(tmp)


def load_inception(weights_path, features: int = 2048, device=None) -> InceptionFeatures:
    """Inception-v3 FID network from a local file (pytorch-fid's or torch-fidelity's ``.pth``, or the same
    tensors as ``.safetensors``), on pool layer ``features`` (64, 192, 768 or 2048; only 2048 is FID).
    The file is read with ``torch.load(weights_only=True)`` (or safetensors) and torch-fidelity gets a
    private copy of the checked tensors (:func:`_inception_module`)."""
    if int(features) not in INCEPTION_LAYERS:
        raise ValueError(f"Inception-v3 features must be one of {INCEPTION_LAYERS} (pool layers), got {features}")
    path = existing_file(weights_path, INCEPTION_EXPECTED)
    sd = read_state_dict(path, INCEPTION_EXPECTED)
    if "Mixed_7c.branch_pool.conv.weight" not in sd or "fc.weight" not in sd:
        raise MetricWeightsError(f"{path} is not an Inception-v3 FID checkpoint (no Mixed_7c / fc tensors); "
                                 f"expected {INCEPTION_EXPECTED}")
    try:
        module = _inception_module(sd, int(features))
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise MetricWeightsError(f"{path} does not fit torch-fidelity's Inception-v3 ({first_line(e)}); "
                                 f"expected {INCEPTION_EXPECTED}") from e
    return InceptionFeatures(module, int(features), _weights_info(path))  # on the CPU; features() takes a device


# ---------------------------------------------------------------- open_clip

def open_clip_model_name(model_name) -> str:
    """An open_clip model name, or the path of an open_clip model-config ``.json`` (a custom
    architecture): that file is registered under its stem, which is returned."""
    import open_clip

    name = str(model_name).strip()
    if name.lower().endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"open_clip model config not found: {path}")
        try:
            open_clip.add_model_config(path)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is not an open_clip model config ({type(e).__name__}: {e})") from e
        return path.stem
    return name


def _check_open_clip_name(model_name: str) -> dict:
    import open_clip

    name = open_clip_model_name(model_name)
    if ":" in name:
        raise ValueError(f"open_clip model '{name}': give a built-in or registered model name (e.g. RN50-quickgelu, "
                         "ViT-B-32); hf-hub:/local-dir: sources are not used (weights come from the file)")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model '{name}'; known: {', '.join(open_clip.list_models())}")
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name") or "siglip" in name.lower():
        raise ValueError(f"open_clip model '{name}' needs a Hugging Face tokenizer or text model (a download); "
                         "use a CLIP model with open_clip's built-in tokenizer (e.g. RN50-quickgelu, ViT-B-32)")
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ValueError(f"open_clip model '{name}' builds its image tower with timm; use a model with open_clip's "
                         "own towers (e.g. RN50-quickgelu, ViT-B-32, ViT-L-14)")
    return cfg


def load_open_clip(model_name: str, weights_path, device=None):
    """``(model, preprocess, tokenizer, weights)`` of an open_clip model from a local checkpoint. The file
    is read without running pickled code; the tokenizer is open_clip's SimpleTokenizer (vocab ships
    with the package). Returns the model in eval mode on the CPU."""
    import open_clip

    _check_open_clip_name(model_name)
    model_name = open_clip_model_name(model_name)
    path = existing_file(weights_path, CLIP_EXPECTED)
    read_state_dict(path, CLIP_EXPECTED)  # refuses pickled code and non-tensor files with a clear message
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(str(model_name).strip(), pretrained=str(path),
                                                                     device="cpu", weights_only=True)
    except RuntimeError as e:
        raise MetricWeightsError(f"{path} does not fit open_clip model '{model_name}' ({first_line(e)}); "
                                 f"expected {CLIP_EXPECTED}") from e
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(str(model_name).strip())
    return model, preprocess, tokenizer, _weights_info(path)


def _clip_pixels(preprocess, batch_u8: torch.Tensor) -> torch.Tensor:
    """open_clip's own eval preprocessing (bicubic resize of the shorter side, center crop, normalize with
    the model's mean/std) on uint8 ``[B, H, W, 3]``."""
    from PIL import Image

    return torch.stack([preprocess(Image.fromarray(im.cpu().numpy())) for im in batch_u8])


class ClipFeatures:
    """open_clip image embeddings (``encode_image``, not normalised) as a feature extractor: "FD (clip:<model>)"."""

    def __init__(self, model_name: str, model, preprocess, weights: dict):
        self.model, self.preprocess, self.weights = model, preprocess, weights
        self.backbone = model_name
        self.name = f"clip:{model_name}"
        self.label, self.kid_label = _distance_labels(self.name, False)

    def features(self, images_u8: ImagesU8, batch_size: int = 16, device=None, progress: Progress = None) -> torch.Tensor:
        items = _as_image_list(images_u8)
        dev = _device(device)
        out = []
        self.model.to(dev)
        try:
            with torch.inference_mode():
                for start in range(0, len(items), max(1, int(batch_size))):
                    chunk = items[start:start + max(1, int(batch_size))]
                    pixels = torch.cat([_clip_pixels(self.preprocess, im[None]) for im in chunk]).to(dev)
                    out.append(self.model.encode_image(pixels).double().cpu())
                    if progress is not None:
                        progress(start + len(chunk), len(items))
        finally:
            self.model.to("cpu")
        return torch.cat(out)


class ClipIQA:
    """CLIP-IQA as the LoRD paper uses it: P(good) from a softmax over the similarities of an image to
    "A good photo of a {class}." and "A bad photo of a {class}."."""

    def __init__(self, backbone: str, model, preprocess, tokenizer, weights: dict):
        self.backbone, self.model, self.preprocess, self.tokenizer, self.weights = backbone, model, preprocess, tokenizer, weights
        self.logit_scale = float(model.logit_scale.detach().exp())  # the multiplier (100 for OpenAI CLIP)

    def prompts(self, class_name: str) -> tuple[str, str]:
        name = str(class_name).strip()
        if not name:
            raise ValueError("CLIP-IQA needs a class name (e.g. 'person') for its prompts")
        return GOOD_PROMPT.format(name), BAD_PROMPT.format(name)

    def text_features(self, class_name: str, device=None) -> torch.Tensor:
        """``[2, D]`` (good, bad) text embeddings, not normalised."""
        dev = _device(device)
        tokens = self.tokenizer(list(self.prompts(class_name))).to(dev)
        self.model.to(dev)
        with torch.inference_mode():
            return self.model.encode_text(tokens).double().cpu()

    def score(self, images_u8: ImagesU8, class_name: str, batch_size: int = 16, device=None,
              progress: Progress = None) -> torch.Tensor:
        """``[N]`` float64 P(good) in (0, 1) per image (higher is better)."""
        items = _as_image_list(images_u8)
        dev = _device(device)
        try:
            text = self.text_features(class_name, dev)
            feats = ClipFeatures(self.backbone, self.model, self.preprocess, self.weights).features(
                items, batch_size, dev, progress)
        finally:
            self.model.to("cpu")
        return clip_iqa_from_features(feats, text[0], text[1], self.logit_scale)


def load_clip_iqa(model_name: str, weights_path, device=None) -> ClipIQA:
    """CLIP-IQA scorer with the open_clip model ``model_name`` (e.g. ``RN50-quickgelu`` for OpenAI's RN50:
    OpenAI's weights need the QuickGELU variant) and weights from a local file (never a download)."""
    model, preprocess, tokenizer, weights = load_open_clip(model_name, weights_path, device)
    return ClipIQA(open_clip_model_name(model_name), model, preprocess, tokenizer, weights)


def load_clip_features(model_name: str, weights_path, device=None) -> ClipFeatures:
    model, preprocess, _, weights = load_open_clip(model_name, weights_path, device)
    return ClipFeatures(open_clip_model_name(model_name), model, preprocess, weights)


# ---------------------------------------------------------------- registry

Loader = Callable[..., FeatureExtractor]
_REGISTRY: dict[str, Loader] = {}
# extractors of this package that live in their own module and register themselves when it is imported
_BUILTIN_MODULES = {"lab-classifier": ".lab_classifier"}


def register_feature_extractor(name: str, loader: Loader) -> None:
    """Add a feature extractor: ``loader(name, weights_path, device=None, **options) -> FeatureExtractor``.
    A ``name`` ending in ':' is a prefix (``"clip:"`` serves every ``clip:<model>``)."""
    _REGISTRY[str(name)] = loader


def known_feature_extractors() -> list[str]:
    """The names :func:`load_feature_extractor` accepts (``clip:<model>`` for the open_clip prefix)."""
    names = list(_REGISTRY) + [n for n in _BUILTIN_MODULES if n not in _REGISTRY]
    return [k + "<model>" if k.endswith(":") else k for k in names]


def load_feature_extractor(name: str, weights_path, device=None, **options) -> FeatureExtractor:
    """Feature extractor by name: ``"inception-v3"`` (option ``features``: pool layer, default 2048 = FID),
    ``"clip:<open_clip model>"``, ``"lab-classifier"`` (:mod:`lord_ops.lab_classifier`), or one added with
    :func:`register_feature_extractor`."""
    name = str(name).strip()
    if name in _BUILTIN_MODULES and name not in _REGISTRY:  # a built-in extractor that registers itself on import
        importlib.import_module(_BUILTIN_MODULES[name], __package__)
    loader = _REGISTRY.get(name)
    if loader is None:
        prefix = name.split(":", 1)[0] + ":" if ":" in name else None
        loader = _REGISTRY.get(prefix) if prefix else None
    if loader is None:
        raise ValueError(f"unknown feature extractor '{name}'; known: {', '.join(known_feature_extractors())}")
    return loader(name, weights_path, device=device, **options)


register_feature_extractor(INCEPTION_NAME, lambda name, path, device=None, features=2048: load_inception(path, features, device))
register_feature_extractor("clip:", lambda name, path, device=None: load_clip_features(name.split(":", 1)[1], path, device))
