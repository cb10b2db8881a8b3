"""Noise-estimator U-Nets for IDM: sources (tiny, SD v1.5, folders), pruning, the wired adapter."""

from .factory import (
    BUILT_IN_UNETS,
    PRIOR_INFO_NAME,
    SD15_UNET_CONFIG,
    UNetSourceError,
    check_prior_schedule,
    check_unet_source,
    describe_unet,
    load_unet_folder,
    materialize,
    read_prior_range,
    tiny_unet_config,
    unet_architecture,
    unet_from_config,
    unet_source_folder,
    unet_weight_files,
)
from .pruning import prune_unet
from .wired_unet import GroupPlan, WiredUNet

__all__ = [
    "BUILT_IN_UNETS",
    "GroupPlan",
    "PRIOR_INFO_NAME",
    "SD15_UNET_CONFIG",
    "UNetSourceError",
    "WiredUNet",
    "check_prior_schedule",
    "check_unet_source",
    "describe_unet",
    "load_unet_folder",
    "materialize",
    "prune_unet",
    "read_prior_range",
    "tiny_unet_config",
    "unet_architecture",
    "unet_from_config",
    "unet_source_folder",
    "unet_weight_files",
]
