"""The lab model (issue 11): a small SD1.x-family latent diffusion model trained here on
Fashion-MNIST (Debian's ``dataset-fashion-mnist``), so the defense can be measured on a model that
generates something. Work in progress: data and the VAE stage."""
