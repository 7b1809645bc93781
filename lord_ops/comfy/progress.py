"""Progress of a training run in ComfyUI: progress bars (data preparation, optimizer steps), a
loss-curve preview (with the latest sample preview beside it when the run samples previews) and
Cancel checked at every step."""
from __future__ import annotations


def loss_preview(history: list[dict]):
    """Small loss curve (PIL image) for the node's progress preview."""
    from PIL import Image, ImageDraw

    w, h, m = 256, 128, 6
    img = Image.new("RGB", (w, h), "white")
    values = [e["loss"] for e in history]
    if len(values) >= 2:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        pts = [(m + i * (w - 2 * m) / (len(values) - 1), h - m - (v - lo) / span * (h - 2 * m)) for i, v in enumerate(values)]
        ImageDraw.Draw(img).line(pts, fill=(30, 90, 200), width=2)
    ImageDraw.Draw(img).text((m, m), f"loss {values[-1]:.4f}" if values else "loss", fill=(0, 0, 0))
    return img


SAMPLE_BOX = 256  # the sample preview is shown in a box this size (pixels), beside the 256 x 128 loss curve


def training_preview(history: list[dict], sample=None):
    """The trainer's progress preview (PIL image): the loss curve (:func:`loss_preview`) and, when
    ``sample`` = ``(step, u8 [H, W, 3])`` is given, that sample to its left, scaled to fit a
    :data:`SAMPLE_BOX` square (nearest-neighbour when enlarged) and labelled with its step."""
    from PIL import Image, ImageDraw

    curve = loss_preview(history)
    if sample is None:
        return curve
    step, image_u8 = sample
    image = Image.fromarray(image_u8.cpu().numpy())
    scale = SAMPLE_BOX / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
    label = 14
    height = max(image.height + label, curve.height)
    tile = Image.new("RGB", (image.width + curve.width, height), "white")
    tile.paste(image, (0, label))
    ImageDraw.Draw(tile).text((4, 1), f"sample at step {step}", fill=(0, 0, 0))
    tile.paste(curve, (image.width, (height - curve.height) // 2))
    return tile


class TrainingProgress:
    """Progress bar over the optimizer steps with a loss-curve preview (and, with previews, the latest
    sample beside it: :meth:`sample`); Cancel checked every step."""

    def __init__(self, steps: int, node_label: str, images: int = 0):
        import comfy.utils

        self.images, self.data_done = images, 0
        self.data_pbar = comfy.utils.ProgressBar(images) if images else None
        self.pbar = None
        self.steps = steps
        self.history: list[dict] = []
        self.every = max(1, steps // 50)
        self.label = node_label
        self.latest_sample = None  # (step, u8 [H, W, 3])
        self.sample_due = False

    def sample(self, step: int, image_u8) -> None:
        """A preview sampled after optimizer step ``step`` (``preview.TrainingPreview``): shown from that
        step's progress update on, beside the loss curve."""
        self.latest_sample = (step, image_u8)
        self.sample_due = True

    def data_item(self, index: int, cached: bool) -> None:
        """One PGD copy made (or read from the cache): the first bar counts images."""
        import comfy.model_management

        self.data_done += 1
        if self.data_pbar is not None:
            self.data_pbar.update_absolute(self.data_done, self.images)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def step(self, rec) -> None:
        import logging

        import comfy.model_management

        import comfy.utils

        if self.pbar is None:  # the second bar counts optimizer steps
            self.pbar = comfy.utils.ProgressBar(self.steps)
        self.history.append({"loss": rec.loss})
        preview = None
        if rec.step % self.every == 0 or rec.step == rec.steps or self.sample_due:
            image = training_preview(self.history, self.latest_sample)
            preview = ("PNG", image, max(image.size))
            self.sample_due = False
            logging.info("%s step %d/%d loss %.5f %s", self.label, rec.step, rec.steps, rec.loss,
                         " ".join(f"{k} {v:.4f}" for k, v in rec.parts.items()))
        self.pbar.update_absolute(rec.step, rec.steps, preview)
        comfy.model_management.throw_exception_if_processing_interrupted()


class ImageProgress:
    """Progress bar over sampled images x sampler steps (generation, purification), the latest image as
    the preview, and Cancel checked at every step: pass ``check``, ``on_step`` and ``on_image`` to
    ``lord_ops.comfy.generate``. Outside a running prompt ComfyUI's bar has no hook and costs nothing."""

    def __init__(self, images: int, steps: int):
        import comfy.utils

        self.images, self.steps = max(1, images), max(1, steps)
        self.pbar = comfy.utils.ProgressBar(self.images * self.steps)

    @staticmethod
    def check() -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()

    def on_step(self, index: int, step: int, total_steps: int) -> None:
        self.steps = max(1, total_steps)
        self.pbar.update_absolute(index * self.steps + step, self.images * self.steps)

    def on_image(self, index: int, image_u8) -> None:
        from PIL import Image

        self.pbar.update_absolute((index + 1) * self.steps, self.images * self.steps,
                                  ("JPEG", Image.fromarray(image_u8.numpy()), 512))
