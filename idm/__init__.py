"""Invertible Diffusion Models (IDM) for imaging inverse problems.

    from idm import IDM, IDMConfig
    model = IDM(IDMConfig(unet="tiny", image_channels=1, steps=3))
    x_hat = model(y, op)          # op: any deepinv LinearPhysics
"""

from idm.sibling_packages import check_sibling_packages

check_sibling_packages(("operators",))  # before any module of idm imports it: a shadowing file named

from idm.config import IDMConfig  # noqa: E402
from idm.model import IDM, StepTrace  # noqa: E402

__all__ = ["IDM", "IDMConfig", "StepTrace"]
__version__ = "0.1.0"
