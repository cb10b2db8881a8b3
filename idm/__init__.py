"""Invertible Diffusion Models (IDM) for imaging inverse problems.

    from idm import IDM, IDMConfig
    model = IDM(IDMConfig(unet="tiny", image_channels=1, steps=3))
    x_hat = model(y, op)          # op: any deepinv LinearPhysics
"""

from idm.config import IDMConfig
from idm.model import IDM, StepTrace

__all__ = ["IDM", "IDMConfig", "StepTrace"]
__version__ = "0.1.0"
