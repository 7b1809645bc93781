"""Training data on ComfyUI's side: images held as 8-bit levels, their CONDITIONINGs and captions,
VAE encoding to latents, and the data's identity (digest) for resuming.

Units: images ``[3, H, W]``, float32 in [0, 1] when read, uint8 levels when stored; ComfyUI IMAGE
batches are ``[B, H, W, C]`` in [0, 1].
"""
from __future__ import annotations

import collections.abc
import dataclasses
import hashlib

import torch

from ..datasets import conditioning_digest, float_bytes, tensor_digest
from ..images import to_uint8, to_unit
from . import grad


class Pixels(collections.abc.Sequence):
    """Images held as uint8 ``[3, H, W]`` (a quarter of float32's memory); items read as float32 in
    [0, 1], one at a time, so code that iterates or indexes sees the usual float images."""

    def __init__(self, images=()):
        self.raw = [to_uint8(im) for im in (images.raw if isinstance(images, Pixels) else images)]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [to_unit(im) for im in self.raw[i]]
        return to_unit(self.raw[i])

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Pixels({len(self.raw)} x {tuple(self.raw[0].shape) if self.raw else ()} uint8)"


@dataclasses.dataclass
class TrainingData:
    """Images ``[3, H, W]`` (one size, multiples of 8), one CONDITIONING and caption each.

    Images may be given as float32 in [0, 1] or uint8; they are kept as 8-bit levels
    (:class:`Pixels`: reading ``images[i]`` gives float32 in [0, 1]), so a float input is rounded
    to 8 bits -- what an image file holds.

    Stage-2 may be given ComfyUI LATENTs instead of images: ``latents`` (raw VAE latents
    ``[C, h, w]`` as VAE Encode makes them; ``images`` then stays empty). ``class_*``: DreamBooth
    prior-preservation images (Stage-2, optional).
    """

    images: list
    conds: list
    captions: list
    class_images: list = dataclasses.field(default_factory=list)
    class_conds: list = dataclasses.field(default_factory=list)
    latents: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.images, self.class_images = Pixels(self.images), Pixels(self.class_images)
        if self.images and self.latents:
            raise ValueError("give training images or latents, not both")
        count = len(self.images) or len(self.latents)
        if not count:
            raise ValueError("the training set is empty: give at least one image")
        if len(self.conds) == 1 and count > 1:
            self.conds = list(self.conds) * count
        if len(self.conds) != count:
            raise ValueError(f"{count} images but {len(self.conds)} conditionings: give one per image, or one for all")
        if len(self.captions) != count:
            self.captions = [f"item {i}" for i in range(count)]
        if len(self.class_conds) == 1 and len(self.class_images) > 1:
            self.class_conds = list(self.class_conds) * len(self.class_images)
        if len(self.class_conds) != len(self.class_images):
            raise ValueError(f"{len(self.class_images)} class images but {len(self.class_conds)} class conditionings")
        sizes = {tuple(im.shape[-2:]) for im in self.images.raw + self.class_images.raw}
        sizes |= {tuple(8 * d for d in z.shape[-2:]) for z in self.latents}
        if len(sizes) != 1:
            raise ValueError(f"training images have different sizes {sorted(sizes)} (px): resize them to one size")
        (h, w), = sizes
        if h % 8 or w % 8:
            raise ValueError(f"training images are {w}x{h} px: width and height must be multiples of 8")

    def __len__(self) -> int:
        return len(self.images) or len(self.latents)

    @property
    def image_hw(self) -> tuple[int, int]:
        if self.images:
            return tuple(self.images.raw[0].shape[-2:])
        return tuple(8 * d for d in self.latents[0].shape[-2:])


def encode_images(vae, model_patcher, images: list) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` (float32 on the CPU, ``latent_format.process_in`` of ``model_patcher``;
    raw VAE latents when it is None) of images ``[3, H, W]`` in [0, 1]. The VAE is loaded by ComfyUI
    first and runs on its compute device (:func:`grad.latent_encoder`)."""
    if vae is None:
        raise ValueError("training from images needs the VAE: connect it (or give latents)")
    encode = grad.latent_encoder(vae, model_patcher)
    with torch.inference_mode(False), torch.no_grad():
        return torch.cat([encode(im[None].float()).float().cpu() for im in images])


def dataset_digest(data: TrainingData) -> str:
    """Identity of a training set (images, captions, latents, class images, conditionings) for resuming."""
    h = hashlib.sha256()
    for im, cap in zip(data.images, data.captions):
        h.update(tensor_digest(im).encode() + cap.encode())
    for z in data.latents:
        h.update(float_bytes(z))
    for im in data.class_images:
        h.update(b"class" + tensor_digest(im).encode())
    for c in data.conds + data.class_conds:
        h.update(conditioning_digest(c).encode())
    return h.hexdigest()[:16]


def images_from_batches(images) -> list:
    """IMAGE batches ``[B, H, W, C]`` in [0, 1] -> list of ``[3, H, W]`` uint8 levels (what the trainers
    keep: a quarter of float32's memory; no float copy of the whole set is made)."""
    out = []
    for batch in images:
        for img in batch:
            out.append(to_uint8(img[..., :3].movedim(-1, 0)))
    return out


def conditionings_from_list(conds) -> list:
    """A CONDITIONING per list item (core's text-encode-over-a-list gives one per caption)."""
    return [c for c in conds if c is not None]
