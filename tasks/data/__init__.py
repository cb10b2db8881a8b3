"""Data loading for the IDM toolkit: image folders, MATLAB files, fastMRI k-space, CT slices.

Every problem with a file or folder raises :class:`DataError` (a
``ValueError``) whose message names the path.
"""

from .ct_slices import (
    CT_EXTENSIONS,
    DEFAULT_HU_WINDOW,
    HU_MIN,
    SOFT_TISSUE_WINDOW,
    ct_num_slices,
    hu_window,
    inverse_hu_window,
    read_ct_slice,
    read_dicom_hu,
    read_npy_hu,
    read_tiff_volume,
    tiff_units_of,
)
from .datasets import (
    ConcatSlices, CTSliceDataset, FastMRIImageDataset, grayscale_dataset, holds_kspace_files, holds_mat_files, ImageFolderDataset,
    MatFolderDataset,
)
from .errors import DataError
from .fastmri_h5 import (
    FastMRISlices, check_fully_sampled, check_single_coil, kspace_to_image, load_fastmri_slices, parse_ismrmrd_sizes,
    read_kspace_slice,
)
from .images import COLOR_MODES, IMAGE_EXTENSIONS, image_size, list_files, list_images, read_image, rgb_to_y
from .matlab import MAT_EXTENSIONS, load_mat, mat_array_shape
from .transforms import (
    DIHEDRAL_INVERSE,
    SHAPE_PRESERVING_DIHEDRAL,
    center_crop,
    check_image_measurable,
    check_size,
    dihedral,
    dihedral_inverse,
    pad_to_multiple,
    random_crop,
    random_crop_params,
    random_dihedral,
    resize_square,
    unpad,
)

__all__ = [
    "DataError",
    # images
    "IMAGE_EXTENSIONS", "COLOR_MODES", "list_files", "list_images", "read_image", "image_size", "rgb_to_y",
    # matlab
    "MAT_EXTENSIONS", "load_mat", "mat_array_shape",
    # fastMRI
    "FastMRISlices", "check_fully_sampled", "check_single_coil", "load_fastmri_slices", "kspace_to_image", "parse_ismrmrd_sizes",
    "read_kspace_slice",
    # CT
    "HU_MIN", "DEFAULT_HU_WINDOW", "SOFT_TISSUE_WINDOW", "CT_EXTENSIONS", "hu_window", "inverse_hu_window",
    "read_dicom_hu", "read_npy_hu", "read_tiff_volume", "tiff_units_of", "ct_num_slices", "read_ct_slice",
    # transforms
    "DIHEDRAL_INVERSE", "SHAPE_PRESERVING_DIHEDRAL", "random_crop_params", "random_crop", "center_crop", "check_image_measurable", "check_size", "resize_square",
    "dihedral", "dihedral_inverse", "random_dihedral", "pad_to_multiple", "unpad",
    # datasets
    "ImageFolderDataset", "MatFolderDataset", "CTSliceDataset", "FastMRIImageDataset", "ConcatSlices", "grayscale_dataset",
    "holds_mat_files", "holds_kspace_files",
]
