"""Tests of tasks.data: every format is exercised on small files written here (no shared data)."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image, ImageOps

from tasks.data import (
    DEFAULT_HU_WINDOW,
    DIHEDRAL_INVERSE,
    ConcatSlices,
    CTSliceDataset,
    DataError,
    ImageFolderDataset,
    MatFolderDataset,
    center_crop,
    ct_num_slices,
    dihedral,
    dihedral_inverse,
    grayscale_dataset,
    hu_window,
    image_size,
    inverse_hu_window,
    kspace_to_image,
    list_images,
    load_fastmri_slices,
    load_mat,
    pad_to_multiple,
    random_crop,
    random_dihedral,
    read_ct_slice,
    read_dicom_hu,
    read_image,
    read_npy_hu,
    read_tiff_volume,
    rgb_to_y,
    tiff_units_of,
    unpad,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rgb8(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- images


def test_gray_png_8bit(tmp_path):
    a = _rng().integers(0, 256, (9, 7), dtype=np.uint8)
    p = tmp_path / "g.png"
    Image.fromarray(a).save(p)
    for color in ("gray", "y"):
        x = read_image(p, color)
        assert x.dtype == torch.float32 and x.shape == (1, 9, 7)
        assert torch.equal(x[0], torch.from_numpy(a.astype(np.float32) / 255))
    rgb = read_image(p, "rgb")
    assert rgb.shape == (3, 9, 7) and torch.equal(rgb[0], rgb[2])


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_gray_16bit(tmp_path, ext):
    a = _rng().integers(0, 65536, (6, 5)).astype(np.uint16)
    p = tmp_path / f"g16{ext}"
    Image.fromarray(a).save(p)
    x = read_image(p, "gray")
    np.testing.assert_allclose(x[0].numpy(), a / 65535.0, atol=1e-7)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_rgb_png_color_conventions(tmp_path):
    from skimage.color import rgb2ycbcr

    a = _rgb8()
    p = tmp_path / "c.png"
    Image.fromarray(a).save(p)
    rgb = read_image(p, "rgb")
    assert rgb.shape == (3, 12, 10)
    assert torch.equal(rgb, torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255))
    gray = read_image(p, "gray")[0].numpy()
    y = read_image(p, "y")[0].numpy()
    # full-range BT.601 = studio-range skimage/Matlab rgb2ycbcr rescaled
    y_ref = (rgb2ycbcr(a)[..., 0] - 16.0) / 219.0
    np.testing.assert_allclose(gray, y_ref, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=0.51 / 255)  # y: OpenCV fixed point, 8-bit grid
    r, g, b = (a[..., i].astype(np.int64) for i in range(3))
    np.testing.assert_array_equal(y * 255, ((4899 * r + 9617 * g + 1868 * b + 8192) >> 14).astype(np.float32))
    assert np.allclose(y * 255, np.round(y * 255), atol=1e-4)
    # rgb_to_y on the rgb tensor gives the float luminance
    np.testing.assert_allclose(rgb_to_y(rgb)[0].numpy(), gray, atol=1e-6)
    # pure colours
    prim = np.zeros((1, 3, 3), np.uint8)
    prim[0, 0, 0] = prim[0, 1, 1] = prim[0, 2, 2] = 255
    Image.fromarray(prim).save(tmp_path / "prim.png")
    g = read_image(tmp_path / "prim.png", "gray")[0, 0].numpy()
    np.testing.assert_allclose(g, [0.299, 0.587, 0.114], atol=1e-6)


def test_palette_tiff_gray_and_color(tmp_path):
    idx = _rng().integers(0, 256, (8, 8), dtype=np.uint8)
    # gray palette (like Set11 Parrots/foreman): Y equals the palette gray level
    im = Image.frombytes("P", (8, 8), idx.tobytes())
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    im.save(tmp_path / "gray_pal.tif")
    x = read_image(tmp_path / "gray_pal.tif", "y")
    assert x.shape == (1, 8, 8)
    assert torch.equal(x[0], torch.from_numpy(idx.astype(np.float32) / 255))
    # coloured palette: expanded through the palette, then luminance
    pal = _rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    im = Image.frombytes("P", (8, 8), idx.tobytes())
    im.putpalette(pal.flatten().tolist())
    im.save(tmp_path / "col_pal.tif")
    rgb = read_image(tmp_path / "col_pal.tif", "rgb")
    assert torch.equal(rgb, torch.from_numpy(pal[idx].transpose(2, 0, 1).astype(np.float32) / 255))
    g = read_image(tmp_path / "col_pal.tif", "gray")[0].numpy()
    expected = (pal[idx].astype(np.float64) / 255) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(g, expected, atol=1e-6)


def test_palette_png_with_transparency(tmp_path):
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    im = Image.frombytes("P", (2, 2), idx.tobytes())
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.info["transparency"] = 0
    im.save(tmp_path / "t.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = read_image(tmp_path / "t.png", "rgb")
    assert torch.allclose(x[:, 0, 0] * 255, torch.tensor([10.0, 20.0, 30.0]))
    assert torch.allclose(x[:, 0, 1] * 255, torch.tensor([200.0, 100.0, 50.0]))


def test_bmp_and_jpeg(tmp_path):
    a = _rgb8(16, 16)
    Image.fromarray(a).save(tmp_path / "a.bmp")
    assert torch.equal(read_image(tmp_path / "a.bmp", "rgb") * 255, torch.from_numpy(a.transpose(2, 0, 1)).float())
    smooth = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    Image.fromarray(np.stack([smooth] * 3, -1)).save(tmp_path / "a.JPG", quality=95)
    x = read_image(tmp_path / "a.JPG", "y")
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert (x[0] - torch.from_numpy(smooth / 255.0).float()).abs().max() < 0.05


def test_list_images_sorted_recursive(tmp_path):
    a = _rgb8(4, 4)
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "a.TIF", "sub/c.jpg", "notes.txt", ".hidden.png"]:
        if name.endswith(".txt"):
            (tmp_path / name).write_text("x")
        else:
            Image.fromarray(a).save(tmp_path / name, format="PNG" if "png" in name else None)
    with pytest.warns(UserWarning, match=r"its sub-folder sub \(sub-folders are not searched: give them as paths too\) "
                      "also hold image files, which are not used"):  # fmt: skip
        assert [p.name for p in list_images(tmp_path)] == ["a.TIF", "b.png"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.TIF", "b.png", "c.jpg"]
    (tmp_path / "only-sub" / "deeper").mkdir(parents=True)
    Image.fromarray(a).save(tmp_path / "only-sub" / "deeper" / "d.png")
    with pytest.raises(DataError, match=r"only-sub: no image files .*; the image files are in its sub-folder deeper \(sub-folders are not searched"):
        list_images(tmp_path / "only-sub")


def test_folder_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        list_images(empty)
    other = tmp_path / "texts"
    other.mkdir()
    (other / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="texts"):
        list_images(other)
    with pytest.raises(DataError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(DataError, match="empty"):
        ImageFolderDataset([empty])


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image_raises(tmp_path, ext):
    p = tmp_path / f"cut{ext}"
    Image.fromarray(_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
    _truncate(p)
    with pytest.raises(DataError, match=f"cut{ext}"):
        read_image(p)


def test_unreadable_and_empty_image_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="bad.png"):
        read_image(bad)
    empty = tmp_path / "zero.tif"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="zero.tif"):
        read_image(empty)
    with pytest.raises(DataError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")
    Image.fromarray(_rgb8()).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="color"):
        read_image(tmp_path / "ok.png", "lab")


def test_rgb_to_y_bad_input():
    with pytest.raises(ValueError, match="x"):
        rgb_to_y(torch.zeros(2, 4, 4))
    x = torch.zeros(3, 4, 4)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        rgb_to_y(x)


# --------------------------------------------------------------------------- MATLAB


def test_mat_v5_and_v4(tmp_path):
    a = _rng().random((5, 3))
    scipy.io.savemat(tmp_path / "v5.mat", {"im": a, "scale": 2.0, "vec": np.arange(4.0)})
    np.testing.assert_array_equal(load_mat(tmp_path / "v5.mat"), a)  # single 2-D matrix picked
    assert load_mat(tmp_path / "v5.mat", key="vec").shape == (1, 4)
    scipy.io.savemat(tmp_path / "v4.mat", {"im": a}, format="4")
    np.testing.assert_array_equal(load_mat(tmp_path / "v4.mat", key="im"), a)


def test_mat_key_errors(tmp_path):
    scipy.io.savemat(tmp_path / "two.mat", {"a": np.ones((3, 3)), "b": np.zeros((4, 4))})
    with pytest.raises(DataError, match="two.mat.*key"):
        load_mat(tmp_path / "two.mat")
    with pytest.raises(DataError, match=r"two.mat.*'c'"):
        load_mat(tmp_path / "two.mat", key="c")
    np.testing.assert_array_equal(load_mat(tmp_path / "two.mat", key="b"), np.zeros((4, 4)))
    (tmp_path / "fake.mat").write_text("MATLAB? no")
    with pytest.raises(DataError, match="fake.mat"):
        load_mat(tmp_path / "fake.mat")
    with pytest.raises(DataError, match="absent.mat"):
        load_mat(tmp_path / "absent.mat")


def _write_v73(path, variables: dict) -> None:
    """A MATLAB v7.3 file: HDF5 with a 512-byte user block; arrays stored column-major."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in variables.items():
            if np.iscomplexobj(arr):
                ct = np.dtype([("real", "<f8"), ("imag", "<f8")])
                data = np.empty(arr.T.shape, ct)
                data["real"], data["imag"] = arr.T.real, arr.T.imag
                d = f.create_dataset(name, data=data)
            else:
                d = f.create_dataset(name, data=np.ascontiguousarray(arr.T))
            d.attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(116))


def test_mat_v73_transposes_back(tmp_path):
    a = _rng().random((6, 4))  # non-square: catches a missing transpose
    z = a + 1j * _rng(1).random((6, 4))
    _write_v73(tmp_path / "im.mat", {"im_ori": a})
    out = load_mat(tmp_path / "im.mat")
    assert out.shape == (6, 4) and out.dtype == np.float64
    np.testing.assert_array_equal(out, a)
    _write_v73(tmp_path / "two.mat", {"im_ori": a, "k": z})
    np.testing.assert_array_equal(load_mat(tmp_path / "two.mat", key="k"), z)
    with pytest.raises(DataError, match="two.mat.*'nope'"):
        load_mat(tmp_path / "two.mat", key="nope")


def test_mat_v73_char_arrays_are_not_images(tmp_path):
    """v7.3 stores a char array as uint16 codes: it is text, as v5's reader says, not a second image."""
    a = _rng().random((6, 4))
    _write_v73(tmp_path / "labelled.mat", {"im": a, "label": np.array([[104, 105], [106, 107]], np.uint16)})
    with h5py.File(tmp_path / "labelled.mat", "r+") as f:
        f["label"].attrs["MATLAB_class"] = np.bytes_("char")
    np.testing.assert_array_equal(load_mat(tmp_path / "labelled.mat"), a)


# --------------------------------------------------------------------------- real-world file variants
def test_a_ct_npy_slice_with_a_trailing_channel_axis_is_named(tmp_path):
    hu = np.full((16, 16, 1), -1000, np.int16)
    hu[4:12, 4:12] = 40
    np.save(tmp_path / "channel.npy", hu)
    for read in (read_npy_hu, ct_num_slices):
        with pytest.raises(DataError, match=r"channel.npy: shape \(16, 16, 1\) reads as 16 slices of 16x1 pixels; it "
                                            r"looks like one slice with a trailing channel axis"):  # fmt: skip
            read(tmp_path / "channel.npy")
    np.save(tmp_path / "stack.npy", hu[..., 0][None].repeat(2, 0))
    assert ct_num_slices(tmp_path / "stack.npy") == (2, 16, 16)


def test_a_ct_tiff_in_hounsfield_units_is_windowed_as_hu(tmp_path):
    """A signed or float TIFF holding HU as they are (air -1000) is read as HU (auto: a negative value); it was
    divided by its maximum and clipped, which set everything at or below 0 HU to 0."""
    import tifffile

    hu = np.resize(np.array([-1000, -100, 0, 40, 1000, 2000], np.int16), (8, 8))
    for name, data in (("int16.tif", hu), ("float.tif", hu.astype(np.float32))):
        tifffile.imwrite(tmp_path / name, np.stack([data, data]))
        x = read_ct_slice(tmp_path / name)[0].numpy()
        np.testing.assert_allclose(x, hu_window(hu.astype(np.float32)), atol=1e-6)
    assert read_tiff_volume(tmp_path / "int16.tif", units="hu")[0, 0, 1] == -100 and float(x.min()) > 0  # air: not clipped to 0
    rounding = np.full((2, 8, 8), 0.5, np.float32)
    rounding[0, 0, 0] = -1e-6  # a processed intensity volume's rounding is no HU
    tifffile.imwrite(tmp_path / "rounded.tif", rounding)
    assert tiff_units_of(rounding) == "intensity" and float(read_ct_slice(tmp_path / "rounded.tif")[0, 0, 1]) == 1.0


def test_uncompressed_tiff_pages_are_turned_upright_and_16_bit_white_is_zero_is_inverted(tmp_path):
    """Pillow mis-turned uncompressed grey TIFF pages with a 90-degree orientation when it memory-mapped them, and
    inverts MINISWHITE pages of 8 bits but not of 16."""
    import tifffile
    from PIL import TiffImagePlugin

    raw = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[274] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(raw).save(tmp_path / "o6.tif", tiffinfo=tags)
    expected = np.rot90(raw, -1)  # what orientation 6 displays
    np.testing.assert_array_equal(read_image(tmp_path / "o6.tif", "gray")[0].numpy(), expected / np.float32(255))
    assert image_size(tmp_path / "o6.tif") == expected.shape
    white16 = np.array([[0, 16384], [49152, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "w16.tif", white16, photometric="miniswhite")
    np.testing.assert_allclose(read_image(tmp_path / "w16.tif", "gray")[0].numpy(), 1 - white16 / 65535, atol=1e-7)
    tifffile.imwrite(tmp_path / "w8.tif", (white16 >> 8).astype(np.uint8), photometric="miniswhite")
    np.testing.assert_allclose(read_image(tmp_path / "w8.tif", "gray")[0].numpy(), 1 - (white16 >> 8) / 255, atol=1e-7)


def test_mask_files_are_read_upright_and_lossy_ones_refused(tmp_path):
    """A JPEG mask's ringing made pixels of its hole 'kept' (the truth given away); a mask is read upright by its
    EXIF orientation, as the images are."""
    from operators import OperatorInputError
    from operators.inpainting import read_mask_file

    mask = np.full((32, 48), 255, np.uint8)
    mask[8:24, 8:20] = 0
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=90)
    with pytest.raises(OperatorInputError, match=r"mask.jpg' holds \d+ grey levels; a mask holds two.*as PNG"):
        read_mask_file(tmp_path / "mask.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(mask).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(read_mask_file(tmp_path / "turned.png"), np.rot90(mask, -1) != 0)
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[274] = 6
    Image.fromarray(mask).save(tmp_path / "turned.tif", tiffinfo=tags)  # uncompressed: Pillow memory-maps it by name
    np.testing.assert_array_equal(read_mask_file(tmp_path / "turned.tif"), np.rot90(mask, -1) != 0)
    binary = mask.copy()
    binary[binary == 255] = 1  # 0/1 masks still read: any non-zero level is kept
    Image.fromarray(binary).save(tmp_path / "binary.png")
    np.testing.assert_array_equal(read_mask_file(tmp_path / "binary.png"), mask != 0)


# --------------------------------------------------------------------------- fastMRI


def _centred_fft(img: np.ndarray) -> np.ndarray:
    ax = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=ax), norm="ortho"), axes=ax)


_HEADER = (
    b'<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
    b"<encodedSpace><matrixSize><x>32</x><y>24</y><z>1</z></matrixSize></encodedSpace>"
    b"<reconSpace><matrixSize><x>16</x><y>16</y><z>1</z></matrixSize></reconSpace>"
    b"</encoding></ismrmrdHeader>"
)


def test_fastmri_singlecoil(tmp_path):
    img = _rng().random((2, 32, 24)) + 0.1j * _rng(1).random((2, 32, 24))
    k = _centred_fft(img).astype(np.complex64)
    recon = np.abs(img[:, 8:24, 4:20]).astype(np.float32)
    p = tmp_path / "file1000.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = k
        f["reconstruction_esc"] = recon
        f["mask"] = np.array([0, 1] * 12, dtype=np.float32)
        f["ismrmrd_header"] = _HEADER
        f.attrs["acquisition"] = "CORPD_FBK"
    s = load_fastmri_slices(p)
    assert s.kspace.shape == (2, 32, 24) and s.kspace.dtype == torch.complex64
    assert s.num_slices == 2 and s.reconstruction_esc.shape == (2, 16, 16)
    assert s.mask.dtype == torch.bool and int(s.mask.sum()) == 12
    assert s.encoded_size == (32, 24, 1) and s.recon_size == (16, 16, 1)
    assert s.attrs["acquisition"] == "CORPD_FBK"
    im = kspace_to_image(s.kspace, crop=(16, 16))
    torch.testing.assert_close(im, s.reconstruction_esc, atol=1e-5, rtol=1e-4)
    full = kspace_to_image(s.kspace, crop=None, magnitude=False)
    np.testing.assert_allclose(full.numpy(), img, atol=1e-5)
    with pytest.raises(ValueError, match="crop"):
        kspace_to_image(s.kspace, crop=(64, 64))


def test_fastmri_optional_parts_missing(tmp_path):
    p = tmp_path / "bare.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = np.ones((1, 4, 4), np.complex64)
        f["ismrmrd_header"] = b"<not xml"
    s = load_fastmri_slices(p)
    assert s.reconstruction_esc is None and s.mask is None
    assert s.encoded_size is None and s.recon_size is None


def test_fastmri_errors(tmp_path):
    p = tmp_path / "nokspace.h5"
    with h5py.File(p, "w") as f:
        f["reconstruction_esc"] = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(DataError, match="nokspace.h5.*kspace"):
        load_fastmri_slices(p)
    p = tmp_path / "multicoil.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = np.zeros((1, 4, 8, 8), np.complex64)
    with pytest.raises(DataError, match=r"multi-coil data is not supported yet \(single-coil only\)"):
        load_fastmri_slices(p)
    p = tmp_path / "real.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(DataError, match="real.h5.*complex"):
        load_fastmri_slices(p)
    p = tmp_path / "pairs.h5"  # real and imaginary parts as a last axis of 2: not multi-coil data
    with h5py.File(p, "w") as f:
        f["kspace"] = np.zeros((1, 8, 8, 2), np.float32)
    with pytest.raises(DataError, match=r"pairs.h5: kspace must be complex .*float32 of shape \(1, 8, 8, 2\)"):
        load_fastmri_slices(p)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="text.h5"):
        load_fastmri_slices(tmp_path / "text.h5")
    with pytest.raises(DataError, match="gone.h5"):
        load_fastmri_slices(tmp_path / "gone.h5")


# --------------------------------------------------------------------------- CT


def test_hu_window():
    hu = np.array([-3024, -1024, 0, 1023.5, 3071, 5000], dtype=np.float32)
    x = hu_window(hu)
    assert DEFAULT_HU_WINDOW == (-1024.0, 3071.0)
    np.testing.assert_allclose(x, [0, 0, 1024 / 4095, 2047.5 / 4095, 1, 1], atol=1e-6)
    assert x.dtype == np.float32
    t = hu_window(torch.tensor([-160.0, 40.0, 240.0]), -160, 240)
    torch.testing.assert_close(t, torch.tensor([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(inverse_hu_window(hu_window(hu[1:5])), hu[1:5], atol=1e-3)
    with pytest.raises(ValueError, match="hu contains NaN"):
        hu_window(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="low < high"):
        hu_window(hu, 100, 100)
    with pytest.raises(ValueError, match="hu_window needs finite low < high"):  # every HU would map to NaN
        hu_window(hu, -np.inf, np.inf)


def test_ct_dataset_window_is_checked(tmp_path):
    np.save(tmp_path / "slice.npy", np.zeros((8, 8), np.int16))
    for window, message in [((-np.inf, np.inf), "finite low < high"), ((100, 0), "finite low < high"),
                            (None, r"a pair \(low, high\)"), (("a", 2), "two numbers")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            CTSliceDataset(tmp_path / "slice.npy", window=window)


def test_npy_hu_clip(tmp_path):
    a = np.array([[-3024, -2000, -1024], [0, 40, 1500]], dtype=np.int16)
    np.save(tmp_path / "s.npy", a)
    hu = read_npy_hu(tmp_path / "s.npy")
    assert hu.dtype == np.float32 and hu.shape == (2, 3)
    np.testing.assert_array_equal(hu, [[-1024, -1024, -1024], [0, 40, 1500]])
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]]))
    with pytest.raises(DataError, match="nan.npy"):
        read_npy_hu(tmp_path / "nan.npy")
    np.save(tmp_path / "vec.npy", np.zeros(5))
    with pytest.raises(DataError, match="vec.npy"):
        read_npy_hu(tmp_path / "vec.npy")
    (tmp_path / "junk.npy").write_text("junk")
    with pytest.raises(DataError, match="junk.npy"):
        read_npy_hu(tmp_path / "junk.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8), np.int16))
    for read in (read_npy_hu, ct_num_slices):
        with pytest.raises(DataError, match=r"empty.npy: expected \(H, W\) or \(N, H, W\) with no empty axis, got shape \(0, 8, 8\)"):
            read(tmp_path / "empty.npy")


def _write_dicom(path, stored: np.ndarray, modality: str = "CT", slope=1.0, intercept=-1024.0,
                 transfer_syntax=None, pixel_bytes=None, samples_per_pixel: int = 1) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = samples_per_pixel
    ds.PhotometricInterpretation = "MONOCHROME2" if samples_per_pixel == 1 else "RGB"
    if samples_per_pixel > 1:
        ds.PlanarConfiguration = 0
        stored = np.repeat(stored[..., None], samples_per_pixel, axis=-1)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixel_bytes if pixel_bytes is not None else stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_ct_to_hu(tmp_path):
    stored = np.array([[-976, 0], [1024, 2048], [1064, 3000]], dtype=np.int16)  # -976 -> -2000 HU
    _write_dicom(tmp_path / "ct.dcm", stored)
    hu = read_dicom_hu(tmp_path / "ct.dcm")
    assert hu.dtype == np.float32 and hu.shape == (3, 2)
    np.testing.assert_array_equal(hu, [[-1024, -1024], [0, 1024], [40, 1976]])
    np.testing.assert_array_equal(read_dicom_hu(tmp_path / "ct.dcm", clip_air=False)[0], [-2000, -1024])
    _write_dicom(tmp_path / "ct2.dcm", stored, slope=2.0, intercept=-1000.0)
    np.testing.assert_array_equal(read_dicom_hu(tmp_path / "ct2.dcm")[1], [1048, 3096])
    assert ct_num_slices(tmp_path / "ct.dcm") == (1, 3, 2)
    x = read_ct_slice(tmp_path / "ct.dcm")
    assert x.shape == (1, 3, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(hu_window(hu)))


def _write_enhanced_ct(path, stored: np.ndarray, shared=(1.0, -1024.0), per_frame=None) -> None:
    """A multi-frame (Enhanced CT) file whose rescale lives only in its functional groups."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    def group(rescale):
        item = Dataset()
        if rescale is not None:
            transform = Dataset()
            transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = rescale[0], rescale[1], "HU"
            item.PixelValueTransformationSequence = Sequence([transform])
        return item

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = EnhancedCTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.NumberOfFrames = "CT", stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SharedFunctionalGroupsSequence = Sequence([group(shared)])
    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = Sequence([group(r) for r in per_frame])
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_ct_dicom_rescale_comes_from_the_functional_groups(tmp_path):
    stored = np.array([[[0, 1024]], [[1064, 2048]]], dtype=np.uint16)  # 2 frames of 1x2
    _write_enhanced_ct(tmp_path / "shared.dcm", stored)
    np.testing.assert_array_equal(read_dicom_hu(tmp_path / "shared.dcm"), [[[-1024, 0]], [[40, 1024]]])
    _write_enhanced_ct(tmp_path / "frames.dcm", stored, per_frame=[(1.0, -1000.0), (2.0, -3000.0)])
    np.testing.assert_array_equal(read_dicom_hu(tmp_path / "frames.dcm", clip_air=False), [[[-1000, 24]], [[-872, 1096]]])
    _write_enhanced_ct(tmp_path / "none.dcm", stored, shared=None)
    with pytest.raises(DataError, match=r"none.dcm.*no RescaleSlope/RescaleIntercept"):
        read_dicom_hu(tmp_path / "none.dcm")


def test_dicom_rejections(tmp_path):
    _write_dicom(tmp_path / "mr.dcm", np.zeros((4, 4), np.int16), modality="MR")
    with pytest.raises(DataError, match=r"mr.dcm.*Modality is 'MR', not 'CT'"):
        read_dicom_hu(tmp_path / "mr.dcm")
    with pytest.raises(DataError, match="mr.dcm.*CT"):
        ct_num_slices(tmp_path / "mr.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="junk.dcm"):
        read_dicom_hu(tmp_path / "junk.dcm")
    _write_dicom(tmp_path / "rgb.dcm", np.zeros((4, 4), np.int16), samples_per_pixel=3)  # a screenshot tagged CT
    for read in (read_dicom_hu, ct_num_slices):
        with pytest.raises(DataError, match=r"rgb.dcm.*SamplesPerPixel 3 and PhotometricInterpretation 'RGB'"):
            read(tmp_path / "rgb.dcm")


def test_dicom_undecodable_jpeg2000_names_package(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    _write_dicom(tmp_path / "j2k.dcm", np.zeros((4, 4), np.int16), transfer_syntax=JPEG2000Lossless,
                 pixel_bytes=encapsulate([b"\xff\x4f\xff\x51 not a codestream"]))
    with pytest.raises(DataError, match=r"j2k.dcm.*JPEG 2000.*pylibjpeg-openjpeg"):
        read_dicom_hu(tmp_path / "j2k.dcm")


def _write_tiff_stack(path, vol: np.ndarray) -> None:
    pages = [Image.fromarray(v) for v in vol]
    pages[0].save(path, save_all=True, append_images=pages[1:])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_tiff_volume_units(tmp_path):
    vol = _rng().integers(0, 3000, (3, 5, 4)).astype(np.uint16)
    vol[1, 0, 0] = 4000
    _write_tiff_stack(tmp_path / "v.tiff", vol)
    assert ct_num_slices(tmp_path / "v.tiff") == (3, 5, 4)
    x = read_tiff_volume(tmp_path / "v.tiff")
    assert x.shape == (3, 5, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, vol / 4000.0, atol=1e-6)
    hu = read_tiff_volume(tmp_path / "v.tiff", units="hu+1024")
    np.testing.assert_array_equal(hu, vol.astype(np.float32) - 1024)
    s = read_ct_slice(tmp_path / "v.tiff", 2)
    np.testing.assert_allclose(s[0].numpy(), vol[2] / 4000.0, atol=1e-6)
    with pytest.raises(DataError, match="v.tiff.*index 3"):
        read_ct_slice(tmp_path / "v.tiff", 3)
    _truncate(tmp_path / "v.tiff", 0.6)
    with pytest.raises(DataError, match="v.tiff"):
        read_tiff_volume(tmp_path / "v.tiff")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_gamma2_display_tiff_is_calibrated_to_hu(tmp_path):
    """Squared 8-bit display levels (the development CT head): air at level 0, the tissue mode at +40 HU."""
    levels = np.zeros((2, 8, 8), np.uint16)
    levels[:, 2:6, 2:6] = 50  # soft tissue: the most frequent level above a tenth of the top
    levels[:, 2, 2:6] = 120  # bone
    levels[0, 0, 0] = 3  # partial volume at the skin: below a tenth of the top, not the mode
    _write_tiff_stack(tmp_path / "display.tif", levels * levels)
    hu = read_tiff_volume(tmp_path / "display.tif")  # "auto" recognises the encoding
    slope = (40 + 1000) / 50
    np.testing.assert_allclose(hu, -1000 + levels * slope, rtol=1e-6)
    np.testing.assert_allclose(read_tiff_volume(tmp_path / "display.tif", units="display-gamma2"), hu)
    window = (-1024, 3071)
    s = read_ct_slice(tmp_path / "display.tif", 1)
    np.testing.assert_allclose(s[0].numpy(), (-1000 + levels[1] * slope + 1024) / 4095, rtol=1e-6)
    ds = CTSliceDataset([tmp_path / "display.tif"], window=window)
    assert torch.allclose(ds[1], s)
    np.testing.assert_allclose(read_tiff_volume(tmp_path / "display.tif", units="intensity"), (levels / 120.0) ** 2, rtol=1e-6)
    not_squares = levels * levels
    not_squares[1, 7, 7] = 2
    assert tiff_units_of(not_squares.astype(np.float32)) == "intensity"
    assert tiff_units_of(np.array([0.0, 4.0, 9.0])) == "intensity"  # top level 3: too few levels to be a display image
    _write_tiff_stack(tmp_path / "air.tif", np.zeros((1, 8, 8), np.uint16))
    with pytest.raises(DataError, match="air.tif.*no display levels above air"):
        read_tiff_volume(tmp_path / "air.tif", units="display-gamma2")


def test_ct_values_that_cannot_be_hounsfield_units_are_refused(tmp_path):
    """A .npy slice in [0, 1] (an image, not HU) and a DICOM whose rescale cannot give HU are named, not read."""
    np.save(tmp_path / "unit.npy", np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    with pytest.raises(DataError, match=r"unit.npy: values lie in \[0, 1\]: .* looks like an image scaled to \[0, 1\]"):
        read_npy_hu(tmp_path / "unit.npy")
    np.save(tmp_path / "water.npy", np.zeros((8, 8), np.int16))  # constant: nothing tells, read as it is
    assert read_npy_hu(tmp_path / "water.npy").max() == 0
    for slope in (0.0, -1.0):
        _write_dicom(tmp_path / "s.dcm", np.full((8, 8), 1000, np.int16), slope=slope)
        with pytest.raises(DataError, match=rf"s.dcm: RescaleSlope {slope:g} and RescaleIntercept -1024 cannot convert"):
            read_dicom_hu(tmp_path / "s.dcm")


def test_ct_slice_dataset(tmp_path):
    np.save(tmp_path / "a.npy", np.full((8, 8), 40, np.int16))
    np.save(tmp_path / "b.npy", np.full((2, 8, 8), -3024, np.int16))
    _write_dicom(tmp_path / "c.dcm", np.full((8, 8), 2048, np.int16))
    _write_tiff_stack(tmp_path / "d.tif", np.full((2, 8, 8), 7, np.uint16))
    (tmp_path / "readme.txt").write_text("ignored")
    ds = CTSliceDataset(tmp_path)
    assert len(ds) == 1 + 2 + 1 + 2
    vals = [float(ds[i].mean()) for i in range(len(ds))]
    np.testing.assert_allclose(vals, [1064 / 4095, 0, 0, 2048 / 4095, 1, 1], atol=1e-6)
    assert all(ds[i].shape == (1, 8, 8) and ds[i].dtype == torch.float32 for i in range(len(ds)))
    soft = CTSliceDataset([tmp_path / "a.npy"], window=(-160, 240), crop=4, augment=True, seed=3)
    assert soft[0].shape == (1, 4, 4) and torch.allclose(soft[0], torch.tensor(0.5))


# --------------------------------------------------------------------------- transforms


def test_dihedral_group():
    x = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0))
    outs = [dihedral(x, k) for k in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(outs[i], outs[j]), (i, j)
        assert torch.equal(dihedral_inverse(outs[i], i), x)
        assert torch.equal(dihedral(outs[i], DIHEDRAL_INVERSE[i]), x)
    assert torch.equal(outs[0], x)
    r = torch.rand(3, 4, 7)
    assert dihedral(r, 1).shape == (3, 7, 4) and dihedral(r, 6).shape == (3, 4, 7)
    for bad in (-1, 8, 1.0, True):
        with pytest.raises(ValueError, match="k"):
            dihedral(x, bad)
    y, k = random_dihedral(r, torch.Generator().manual_seed(1))
    assert k in (0, 2, 4, 6) and y.shape == r.shape


def test_crops():
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 5, 7)
    c1 = random_crop(x, (3, 4), torch.Generator().manual_seed(5))
    c2 = random_crop(x, (3, 4), torch.Generator().manual_seed(5))
    assert c1.shape == (1, 3, 4) and torch.equal(c1, c2)
    assert torch.equal(random_crop(x, (5, 7)), x)
    with pytest.raises(DataError, match="6x4.*5x7"):
        random_crop(x, (6, 4))
    assert torch.equal(center_crop(x, 3), x[:, 1:4, 2:5])
    with pytest.raises(DataError, match="5x8.*5x7"):
        center_crop(x, (5, 8))
    with pytest.raises(ValueError, match="x"):
        random_crop(torch.zeros(5), 2)


def test_pad_to_multiple():
    x = torch.rand(2, 1, 30, 45)
    y, pad = pad_to_multiple(x, 32)
    assert y.shape == (2, 1, 32, 64) and pad == (2, 19)
    assert torch.equal(y[..., :30, :45], x) and y[..., 30:, :].abs().sum() == 0 and y[..., 45:].abs().sum() == 0
    assert torch.equal(unpad(y, pad), x)
    z, pad0 = pad_to_multiple(torch.rand(64, 32), 32)
    assert pad0 == (0, 0) and z.shape == (64, 32)
    with pytest.raises(ValueError, match="multiple"):
        pad_to_multiple(x, 0)


# --------------------------------------------------------------------------- datasets


def _image_folder(tmp_path, sizes=((20, 24), (16, 16), (8, 10))):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_rgb8(h, w, seed=i)).save(d / f"im{i}.png")
    return d


def test_joined_datasets_draw_their_own_crops_and_flips(tmp_path):
    """One seed for every part, but item i of one part and item i of another draw independent crops and
    flips; the first part draws as it would on its own, and parts nested one level down are numbered too."""
    from tasks.mri import ComplexFromMagnitude

    d = _image_folder(tmp_path)

    def part() -> ImageFolderDataset:
        return ImageFolderDataset(d / "im0.png", color="y", crop=8, augment=True, seed=5)

    def state(dataset: ImageFolderDataset) -> torch.Tensor:
        return dataset.generator(0).get_state()

    alone = part()
    joined = ConcatSlices([part(), part(), part()])
    assert torch.equal(state(joined.parts[0]), state(alone)) and torch.equal(joined[0], alone[0])
    states = [state(p) for p in joined.parts]
    assert not any(torch.equal(a, b) for i, a in enumerate(states) for b in states[i + 1 :])
    nested = ConcatSlices([ComplexFromMagnitude(ConcatSlices([part(), part()])), part()])
    leaves = [*nested.parts[0].magnitudes.parts, nested.parts[1]]
    assert [leaf.stream for leaf in leaves] == [0, 1, 2]


def test_image_folder_dataset_crop_and_determinism(tmp_path):
    d = _image_folder(tmp_path)
    rng_state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="1 of 3 images are smaller than the crop 12x12"):
        ds = ImageFolderDataset([d], color="y", crop=12, augment=True, seed=7)
    assert len(ds) == 2
    items = [ds[i] for i in range(len(ds))]
    assert all(t.shape == (1, 12, 12) and t.dtype == torch.float32 for t in items)
    assert all(0 <= float(t.min()) and float(t.max()) <= 1 for t in items)
    with pytest.warns(UserWarning):
        again = ImageFolderDataset(d, color="y", crop=12, augment=True, seed=7)
    assert all(torch.equal(a, again[i]) for i, a in enumerate(items))
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i]) for i, a in enumerate(items))
    ds.set_epoch(0)
    assert torch.equal(ds[1], items[1]) and torch.equal(ds[-1], items[1])
    assert torch.equal(torch.get_rng_state(), rng_state)  # no global RNG use
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(DataError, match="crop size 30x30 is larger than every image"):
        ImageFolderDataset(d, crop=30)
    full = ImageFolderDataset([d / "im1.png", d / "im2.png"], color="rgb")
    assert [tuple(full[i].shape) for i in range(2)] == [(3, 16, 16), (3, 8, 10)]
    with pytest.raises(DataError, match="nope"):
        ImageFolderDataset([d, tmp_path / "nope"])
    with pytest.raises(ValueError, match="color"):
        ImageFolderDataset(d, color="cmyk")


def test_dataset_reports_bad_file(tmp_path):
    d = _image_folder(tmp_path, sizes=((16, 16),))
    _truncate(d / "im0.png")
    ds = ImageFolderDataset(d)
    with pytest.raises(DataError, match="im0.png"):
        ds[0]
    (d / "junk.png").write_text("junk")
    with pytest.raises(DataError, match="junk.png"):
        ImageFolderDataset(d, crop=4)  # headers are read at construction with crop


def test_dataloader_workers_match(tmp_path):
    d = _image_folder(tmp_path, sizes=((16, 16),) * 4)
    ds = ImageFolderDataset(d, color="gray", crop=8, augment=True, seed=1)
    direct = torch.stack([ds[i] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    torch.testing.assert_close(torch.cat(list(loader)), direct, rtol=0, atol=0)


def test_mat_folder_dataset(tmp_path):
    d = tmp_path / "mats"
    d.mkdir()
    _write_v73(d / "im-01.mat", {"im_ori": _rng().random((10, 12))})
    scipy.io.savemat(d / "im-02.mat", {"im_ori": _rng(1).random((10, 12))})
    ds = MatFolderDataset(d, key="im_ori", crop=(8, 8), augment=True, seed=0)
    assert len(ds) == 2 and ds[0].shape == (1, 8, 8) and ds[1].dtype == torch.float32
    full = MatFolderDataset(d)
    np.testing.assert_allclose(full[0][0].numpy(), _rng().random((10, 12)).astype(np.float32))
    scipy.io.savemat(d / "im-03.mat", {"im_ori": 5 * np.ones((10, 12))})
    with pytest.raises(DataError, match="im-03.mat.*normalize"):
        MatFolderDataset(d)[2]
    assert float(MatFolderDataset(d, normalize=True)[2].max()) == 1.0


def test_grayscale_dataset_mixes_image_and_mat_folders(tmp_path):
    mats, images = tmp_path / "mats", tmp_path / "images"
    mats.mkdir()
    images.mkdir()
    scipy.io.savemat(mats / "mr.mat", {"im": _rng().random((12, 12))})
    Image.fromarray((_rng(1).random((12, 12)) * 255).astype(np.uint8)).save(images / "nat.png")
    ds = grayscale_dataset([images, mats], crop=8, augment=True, seed=3)
    assert isinstance(ds, ConcatSlices) and len(ds) == 2
    assert [ds.item_name(i) for i in range(2)] == ["mr", "nat"]
    assert all(ds[i].shape == (1, 8, 8) for i in range(2))
    ds.set_epoch(1)
    assert all(part.epoch == 1 for part in ds.parts)
    assert isinstance(grayscale_dataset(images), ImageFolderDataset)  # one kind: no wrapper
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(DataError, match="no image or .mat"):
        grayscale_dataset([])
    Image.fromarray((_rng(2).random((12, 12)) * 255).astype(np.uint8)).save(mats / "stray.png")  # would be skipped
    with pytest.raises(DataError, match=r"mats holds .mat files and image files \(stray.png, ...\)"):
        grayscale_dataset([images, mats])


def _png16(path, pixels: np.ndarray) -> None:
    """Write ``pixels`` (H, W, C) uint16, C in 2 (grey + alpha), 3 or 4, as a 16-bit PNG (Pillow cannot)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter type 0 per row
    colour_type = {2: 4, 3: 2, 4: 6}[channels]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))  # fmt: skip


def test_16_bit_colour_images_are_read_at_full_precision(tmp_path):
    """Pillow reduces 16-bit RGB(A) and grey + alpha PNGs and TIFFs to 8 bits per channel: they are read at their
    full 16 bits instead (PNG by torchvision, TIFF by tifffile, planar TIFFs too), alpha dropped; 8-bit files as
    before, and without a warning."""
    import tifffile

    rgba16 = (np.random.default_rng(0).random((8, 6, 4)) * 65535).astype(np.uint16)
    truth_rgb = torch.from_numpy(rgba16[..., :3] / 65535.0).permute(2, 0, 1).float()
    _png16(tmp_path / "rgb.png", rgba16[..., :3])
    _png16(tmp_path / "rgba.png", rgba16)
    _png16(tmp_path / "grey-alpha.png", rgba16[..., :2])
    tifffile.imwrite(tmp_path / "rgb.tif", rgba16[..., :3], photometric="rgb", compression="zlib")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba16, photometric="rgb", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgba16[..., :3], -1, 0).copy(), photometric="rgb",
                     planarconfig="separate")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("rgb.png", "rgba.png", "rgb.tif", "rgba.tif", "planar.tif"):
            x = read_image(tmp_path / name, "rgb")
            assert x.shape == (3, 8, 6) and (x - truth_rgb).abs().max() < 1e-6, name  # 8 bits would be 1/255 off
            gray = read_image(tmp_path / name, "gray")
            assert (gray - rgb_to_y(truth_rgb)).abs().max() < 1e-6, name
        grey_alpha = read_image(tmp_path / "grey-alpha.png", "gray")
        assert (grey_alpha[0] - torch.from_numpy(rgba16[..., 0] / 65535.0).float()).abs().max() < 1e-6
        Image.fromarray((rgba16[..., :3] >> 8).astype(np.uint8)).save(tmp_path / "c8.png")
        x8 = read_image(tmp_path / "c8.png", "rgb")  # 8-bit colour: Pillow's path, as before
        assert (x8 * 255 - torch.from_numpy((rgba16[..., :3] >> 8).astype(np.float32)).permute(2, 0, 1)).abs().max() < 1e-4


def test_16_bit_tiffs_other_than_rgb_stay_pillows_and_orientation_is_applied(tmp_path):
    """A 16-bit CMYK TIFF is Pillow's, which converts it to RGB (its first three channels are not R, G, B); a
    16-bit RGB TIFF's Orientation tag turns it upright, as Pillow turns an 8-bit image."""
    import tifffile

    rng = np.random.default_rng(3)
    cmyk16 = (rng.random((6, 5, 4)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyk16, photometric="separated")
    with Image.open(tmp_path / "cmyk.tif") as im:
        pillows = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    assert torch.allclose(read_image(tmp_path / "cmyk.tif", "rgb"), torch.from_numpy(pillows).permute(2, 0, 1))
    rgb16 = (rng.random((6, 5, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "turned.tif", rgb16, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    upright = np.rot90(rgb16, -1)  # orientation 6: rotate 90 degrees clockwise to view
    x = read_image(tmp_path / "turned.tif", "rgb")
    assert x.shape == (3, 5, 6) and (x - torch.from_numpy(upright / 65535.0).permute(2, 0, 1)).abs().max() < 1e-6


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_the_header_size_of_a_turned_image_is_the_size_it_is_read_at(tmp_path, suffix):
    """Orientation 6 (a quarter turn): a 20x30 picture is read as 30x20, and its header says so (Pillow reports
    a TIFF's size turned already, a PNG's or JPEG's not: turned once either way)."""
    from tasks.data import image_size

    image = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / f"turned{suffix}", exif=exif)
    assert image_size(tmp_path / f"turned{suffix}") == tuple(read_image(tmp_path / f"turned{suffix}", "rgb").shape[-2:]) == (30, 20)


def test_a_deep_colour_image_that_cannot_be_read_fully_is_named(tmp_path, monkeypatch):
    """A truncated 16-bit colour PNG is a DataError naming the file; a 16-bit colour TIFF whose compression needs
    the optional imagecodecs package falls back to Pillow's 8 bits with a warning that says how to read it fully;
    EXIF orientation turns the array as Pillow turns an image, for every code."""
    import tifffile

    from tasks.data import deep_colour

    rgb16 = (np.random.default_rng(1).random((8, 6, 3)) * 65535).astype(np.uint16)
    _png16(tmp_path / "rgb.png", rgb16)
    (tmp_path / "cut.png").write_bytes((tmp_path / "rgb.png").read_bytes()[:-40])
    with pytest.raises(DataError, match="cut.png: cannot read image"):
        read_image(tmp_path / "cut.png", "rgb")
    tifffile.imwrite(tmp_path / "rgb.tif", rgb16, photometric="rgb")

    def needs_codec(path):
        raise deep_colour._CodecMissing("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(deep_colour, "_read_tiff_first_page", needs_codec)
    with pytest.warns(UserWarning, match="rgb.tif: a 16-bit colour TIFF read at 8 bits .*pip install imagecodecs"):
        x = read_image(tmp_path / "rgb.tif", "rgb")
    assert (x - torch.from_numpy(rgb16 / 65535.0).permute(2, 0, 1)).abs().max() <= 1 / 255
    monkeypatch.setattr(deep_colour, "_read_png16", needs_codec)  # a torchvision without its deprecated decoder
    with pytest.warns(UserWarning, match="rgb.png: a 16-bit colour PNG read at 8 bits .*no PNG decoder"):
        read_image(tmp_path / "rgb.png", "rgb")
    pixels = (np.arange(4 * 7 * 3) % 251).astype(np.uint8).reshape(4, 7, 3)
    for orientation in range(1, 9):
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = orientation
        image.info["exif"] = exif.tobytes()
        upright = np.asarray(ImageOps.exif_transpose(image))
        assert np.array_equal(deep_colour.apply_exif_orientation(pixels, orientation), upright), orientation
