"""diffusion_jax: denoising diffusion models (DDPM, DDIM) in JAX and Flax."""

__version__ = '0.1.0'
