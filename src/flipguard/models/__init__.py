"""Models: the SSIM-AE family autoencoder and loading of arbitrary ``pkg.module:factory`` models.

Example:
    >>> from flipguard.models import CAEConfig, build_cae
    >>> model = build_cae(CAEConfig(input_size=32, width=0.25, latent_dim=8))
"""

from flipguard.models.cae import CAE, CAEConfig, StrictConfig, build_cae, count_parameters
from flipguard.models.loading import ModelLoadError, load_model

__all__ = [
    "CAE",
    "CAEConfig",
    "ModelLoadError",
    "StrictConfig",
    "build_cae",
    "count_parameters",
    "load_model",
]
