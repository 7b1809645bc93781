"""The lab model: a small SD1.x-family latent diffusion model trained here on Fashion-MNIST (Debian's
``dataset-fashion-mnist``) without the class "bag", so the defense can be measured on a model that
generates something, on a CPU; and what runs on it (``lab.demo``, ``lab.experiment``).
See ``lab/MODEL_CARD.md``."""
