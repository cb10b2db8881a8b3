"""Flipped and turned operators (``operators.dihedral``) and IDM's test-time ensemble (``idm.ensemble``)."""

from __future__ import annotations

import pytest
import torch

import operators
from idm import IDM, IDMConfig
from idm.ensemble import ENSEMBLE_SIZES, check_ensemble_size, ensemble_reconstruct
from operators.dihedral import DIHEDRAL, Dihedral, Transformed
from operators.stacked import Stacked
from tests.conftest import perturbed_model, relative_error


def _composes_within(elements, image) -> bool:
    """Whether applying any two of ``elements`` in turn acts on ``image`` as one of them does."""
    singles = [g.apply(image) for g in elements]
    return all(any(torch.equal(h.apply(g.apply(image)), s) for s in singles) for g in elements for h in elements)


def test_the_dihedral_group_is_listed_once_each_with_subgroups_first():
    image = torch.arange(20.0).reshape(1, 1, 4, 5)  # no symmetry of its own: every element acts differently
    square = torch.arange(16.0).reshape(1, 1, 4, 4)
    outputs = [g.apply(square) for g in DIHEDRAL]
    assert len(DIHEDRAL) == 8 and all(not torch.equal(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1:])
    for g in DIHEDRAL:
        assert torch.equal(g.invert(g.apply(image)), image)
        assert g.apply(image).shape[-2:] == ((5, 4) if g.swaps_height_and_width else (4, 5))
    for size in ENSEMBLE_SIZES:  # each ensemble is a group: its average does not favour one orientation
        assert _composes_within(DIHEDRAL[:size], square)
        assert all(not g.swaps_height_and_width for g in DIHEDRAL[:size]) == (size < 8)
    assert not _composes_within(DIHEDRAL[:3], square)
    assert str(DIHEDRAL[0]) == "identity" and str(DIHEDRAL[5]) == "90 degree turn + flip"
    with pytest.raises(ValueError, match="0-3 quarter turns"):
        Dihedral(4)


OPERATORS = {
    "cs": lambda: operators.make("cs", img_size=(16, 24), ratio=0.3, block=8, mode="permuted", seed=1),
    "inpainting": lambda: operators.make("inpainting", img_size=(12, 20), channels=3, ratio=0.5, seed=2),
    "mri": lambda: operators.make("mri", img_size=(16, 20), acceleration=4, center_fraction=0.1, seed=3),
    "ct": lambda: operators.make("ct", img_size=(16, 16), views=9),
}


@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize("symmetry", DIHEDRAL, ids=str)
def test_a_transformed_operator_measures_the_transformed_image_alike_and_keeps_its_adjoint_and_pinv(name, symmetry):
    op = OPERATORS[name]()
    turned = Transformed(op, symmetry)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, *op.image_shape, generator=generator, dtype=torch.float64)
    x_turned = symmetry.apply(x)
    assert turned.image_shape == tuple(x_turned.shape[1:])
    y = op.A(x)
    assert relative_error(turned.A(x_turned), y) < 1e-14  # the same measurements: A_g (T_g x) = A x
    probe = torch.rand(y.shape, generator=generator, dtype=torch.float64)
    left, right = float((turned.A(x_turned) * probe).sum()), float((x_turned * turned.A_adjoint(probe)).sum())
    assert abs(left - right) < 1e-12 * abs(left)
    assert turned.exact_pinv == op.exact_pinv and turned.linear_pinv == op.linear_pinv
    if op.exact_pinv:  # A_g A_g^+ y = y, and A_g^+ A_g symmetric
        assert relative_error(turned.A(turned.A_dagger(y)), y) < 1e-12
        z = torch.rand(x_turned.shape, generator=generator, dtype=torch.float64)
        project = lambda v: turned.A_dagger(turned.A(v))  # noqa: E731
        assert abs(float((project(x_turned) * z).sum()) - float((x_turned * project(z)).sum())) < 1e-10
    turned.check_measurement(y)  # the operator's own checks
    with pytest.raises(operators.OperatorInputError, match="must have shape"):
        turned.check_measurement(y[..., :-1])


def test_a_transformed_foreign_physics_has_no_image_shape_to_give():
    from deepinv.physics import Inpainting

    op = Inpainting(img_size=(1, 4, 6), mask=0.5)  # a deepinv physics: it does not say its image shape
    turned = Transformed(op, DIHEDRAL[4])
    assert getattr(turned, "image_shape", None) is None  # IDM then asks A_adjoint for it
    assert turned.A_adjoint(torch.rand(1, 1, 4, 6)).shape == (1, 1, 6, 4)
    with pytest.raises(TypeError, match="Dihedral"):
        Transformed(op, 1)
    model = IDM(IDMConfig(unet="tiny", steps=1)).eval()  # measurements of the wrong shape: named, as without turns
    op = Inpainting(img_size=(1, 16, 16), mask=0.5)
    for size, per_call in ((1, 1), (2, 1), (2, 2)):  # stacked: the error names y's shape, not the stack's
        with pytest.raises(ValueError, match=r"failed on y of shape \(1, 1, 16, 12\)"):
            ensemble_reconstruct(model, torch.rand(1, 1, 16, 12), op, size, members_per_call=per_call)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        ensemble_reconstruct(model, [1.0], op, 8, members_per_call=4)


@pytest.mark.parametrize("size", [2, 4, 8])
def test_the_ensemble_of_an_idm_with_a_final_projection_meets_the_measurements(size):
    op = OPERATORS["cs"]()
    model = perturbed_model(IDMConfig(unet="tiny", steps=2, invertible="both", final_projection=True)).eval()
    x = torch.rand(1, *op.image_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = op.A(x)
    with torch.no_grad():
        plain = model(y, op)
        ensembled = ensemble_reconstruct(model, y, op, size)
        members = [g.invert(model(y, Transformed(op, g))) for g in DIHEDRAL[:size]]
    assert relative_error(op.A(ensembled), y) < 1e-12  # every member meets A x = y, so does their mean
    assert relative_error(ensembled, torch.stack(members).mean(0)) < 1e-14
    assert relative_error(ensembled, plain) > 1e-4  # the members differ: the network is not equivariant


def test_an_ensemble_of_one_is_the_model_and_a_pseudo_inverse_is_its_own_ensemble():
    op = OPERATORS["inpainting"]()
    y = op.A(torch.rand(2, *op.image_shape, dtype=torch.float64))
    model = perturbed_model(IDMConfig(unet="tiny", image_channels=3, steps=1)).eval()
    with torch.no_grad():
        assert torch.equal(ensemble_reconstruct(model, y, op, 1), model(y, op))
    pinv = lambda y, op, generator=None: op.A_dagger(y)  # noqa: E731 -- equivariant: every member is A^+ y
    for size in ENSEMBLE_SIZES:
        assert relative_error(ensemble_reconstruct(pinv, y, op, size), op.A_dagger(y)) < 1e-15


@pytest.mark.parametrize("size", [0, 3, 16, True, 2.0, "8"])
def test_ensemble_sizes_outside_the_subgroups_are_refused(size):
    with pytest.raises(ValueError, match="must be one of 1, 2, 4, 8"):
        check_ensemble_size(size)


def test_tall_turns_wide_images_a_quarter_in_every_member_and_leaves_others_alone():
    quarter = DIHEDRAL[4]
    assert all(g.after(quarter).swaps_height_and_width != g.swaps_height_and_width for g in DIHEDRAL)
    wide, square = OPERATORS["cs"](), operators.make("cs", img_size=(16, 16), ratio=0.3, block=8, seed=1)
    model = perturbed_model(IDMConfig(unet="tiny", steps=1)).eval()
    for op in (wide, square):
        y = op.A(torch.rand(1, *op.image_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
        first = quarter if op is wide else DIHEDRAL[0]
        with torch.no_grad():
            for size in ENSEMBLE_SIZES:
                members = [g.after(first) for g in DIHEDRAL[:size]]
                expected = torch.stack([g.invert(model(y, Transformed(op, g))) for g in members]).mean(0)
                assert relative_error(ensemble_reconstruct(model, y, op, size, tall=True), expected) < 1e-14
            plain = ensemble_reconstruct(model, y, op, 1)
            assert (relative_error(ensemble_reconstruct(model, y, op, 1, tall=True), plain) > 1e-4) == (op is wide)


def test_tall_reads_the_width_from_a_physics_without_image_shape():
    from deepinv.physics import Inpainting

    def width_seen(y, op, generator=None):  # a "model" that returns the width of the images it is given
        x = op.A_dagger(y)
        return torch.full_like(x, float(x.shape[-1]))

    op = Inpainting(img_size=(1, 8, 12), mask=0.5)
    y = op.A(torch.rand(1, 1, 8, 12))
    assert torch.equal(ensemble_reconstruct(width_seen, y, op, 1, tall=True), torch.full((1, 1, 8, 12), 8.0))
    assert torch.equal(ensemble_reconstruct(width_seen, y, op, 1), torch.full((1, 1, 8, 12), 12.0))


@pytest.mark.parametrize("name", list(OPERATORS))
def test_stacked_operators_each_measure_their_slice_of_the_batch_with_their_adjoint_and_pinv(name):
    op = OPERATORS[name]()
    parts = [Transformed(op, DIHEDRAL[0]), Transformed(op, DIHEDRAL[2]), op]  # one image shape, three operators
    stacked = Stacked(parts)
    generator = torch.Generator().manual_seed(6)
    x = torch.rand(3 * 2, *op.image_shape, generator=generator, dtype=torch.float64)
    slices = x.chunk(3)
    y = stacked.A(x)
    assert torch.equal(y, torch.cat([part.A(s) for part, s in zip(parts, slices)]))
    probe = torch.rand(y.shape, generator=generator, dtype=torch.float64)
    left, right = float((y * probe).sum()), float((x * stacked.A_adjoint(probe)).sum())
    assert abs(left - right) < 1e-12 * abs(left)
    assert torch.equal(stacked.A_dagger(y), torch.cat([part.A_dagger(s) for part, s in zip(parts, y.chunk(3))]))
    assert stacked.image_shape == op.image_shape
    assert list(stacked.children())[-1] is stacked.operators and len(stacked.operators) == 3  # submodules: .to() moves them
    assert (stacked.exact_pinv, stacked.linear_pinv) == (op.exact_pinv, op.linear_pinv)
    stacked.check_measurement(y)  # each operator's own check, on its slice
    with pytest.raises(operators.OperatorInputError, match="must have shape"):
        stacked.check_measurement(y[..., :-1])
    with pytest.raises(ValueError, match=r"x of shape \(5, .*does not split into 3 equal slices"):
        stacked.A(x[:5])


def test_stacked_operators_refuse_what_they_cannot_stack():
    from deepinv.physics import Inpainting

    wide = OPERATORS["cs"]()
    with pytest.raises(ValueError, match="images of different shapes"):
        Stacked([wide, Transformed(wide, DIHEDRAL[4])]).image_shape
    with pytest.raises(ValueError, match="at least one operator"):
        Stacked([])
    with pytest.raises(TypeError, match="lacks A, A_adjoint, A_dagger"):
        Stacked([wide, lambda x: x])
    foreign = Stacked([Inpainting(img_size=(1, 4, 6), mask=0.5)] * 2)  # a deepinv physics says neither
    assert getattr(foreign, "image_shape", None) is None and getattr(foreign, "check_measurement", None) is None
    assert foreign.A_adjoint(torch.rand(4, 1, 4, 6)).shape == (4, 1, 4, 6)


ENSEMBLE_MODELS = {
    "cs": dict(steps=2, invertible="both", final_projection=True),
    "inpainting": dict(image_channels=3, separate_channels=True, steps=1),
    "mri": dict(image_channels=2, steps=1, invertible="steps"),
    "ct": dict(steps=1, final_projection=True),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_members_stacked_in_one_call_give_the_ensemble_of_members_one_by_one(name):
    op = OPERATORS[name]()
    model = perturbed_model(IDMConfig(unet="tiny", **ENSEMBLE_MODELS[name])).eval()
    y = op.A(torch.rand(2, *op.image_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    # CT's final projection is conjugate gradients on an ill-posed problem: it amplifies the rounding of sums
    # over a stacked (contiguous) batch instead of a turned (strided) one, 1e-16 to about 1e-8 here, as it
    # amplifies the difference between a batch of images and the same images one at a time
    tolerance = 1e-7 if name == "ct" else 1e-12
    with torch.no_grad():
        for size, tall in ((4, False), (8, False), (8, True), (2, True)):
            one_by_one = ensemble_reconstruct(model, y, op, size, tall=tall)
            for per_call in (2, 4):
                stacked = ensemble_reconstruct(model, y, op, size, tall=tall, members_per_call=per_call)
                assert relative_error(stacked, one_by_one) < tolerance, (size, tall, per_call)
    for bad in (0, -1, 1.0, True, "4"):
        with pytest.raises(ValueError, match="members_per_call must be a positive int"):
            ensemble_reconstruct(model, y, op, 2, members_per_call=bad)


def test_members_are_stacked_only_with_members_of_their_image_shape():
    calls = []

    def recording(y, op, generator=None):  # a "model" that records the batches it is given: A^+ y
        calls.append((y.shape[0], tuple(op.A_dagger(y).shape[-2:])))
        return op.A_dagger(y)

    op = OPERATORS["cs"]()  # 16 x 24: wide
    y = op.A(torch.rand(1, *op.image_shape, dtype=torch.float64))
    for tall, per_call, expected in ((False, 4, [(4, (16, 24)), (4, (24, 16))]),
                                     (True, 4, [(4, (24, 16)), (4, (16, 24))]),
                                     (False, 3, [(3, (16, 24)), (1, (16, 24)), (3, (24, 16)), (1, (24, 16))]),
                                     (False, 8, [(4, (16, 24)), (4, (24, 16))])):  # fmt: skip
        calls.clear()
        assert relative_error(ensemble_reconstruct(recording, y, op, 8, tall=tall, members_per_call=per_call),
                              op.A_dagger(y)) < 1e-15  # fmt: skip
        assert calls == expected
    calls.clear()
    ensemble_reconstruct(recording, y, op, 8)  # the default on the CPU: one at a time
    assert calls == [(1, (16, 24))] * 4 + [(1, (24, 16))] * 4


def test_stacked_members_that_run_out_of_memory_run_again_one_at_a_time():
    calls = []

    def small_memory(y, op, generator=None):  # a "model" whose device holds one image: A^+ y
        calls.append(y.shape[0])
        if y.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return op.A_dagger(y)

    op = OPERATORS["cs"]()
    y = op.A(torch.rand(1, *op.image_shape, dtype=torch.float64))
    ensembled = ensemble_reconstruct(small_memory, y, op, 8, members_per_call=4)
    assert relative_error(ensembled, op.A_dagger(y)) < 1e-15
    assert calls == [4, 1, 1, 1, 1] * 2


def _transpose_symmetric(model: IDM) -> IDM:
    """``model`` made exactly transpose-equivariant: every kernel made symmetric, ``w = (w + w^T) / 2``, and the
    injectors that work through a pixel shuffle (whose sub-pixel layout has no such symmetry) silenced."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.transpose(-1, -2)) / 2)
            if getattr(module, "scale", 1) > 1 and hasattr(module, "to_feature"):
                module.to_feature.weight.zero_()
                module.to_feature.bias.zero_()
    return model


@pytest.mark.parametrize("name", ["cs", "inpainting"])
@pytest.mark.parametrize("invertible", ["none", "both"])
def test_idm_treats_height_and_width_alike_so_a_preference_for_tall_images_is_learned(name, invertible):
    """With symmetric kernels the whole pipeline (U-Net padding, skips, upsamplers, injectors at full
    resolution, steps, final projection) must give the transposed reconstruction of the transposed problem
    on a wide image; a mix-up of height and width anywhere would break this on non-square images only.
    (The shipped natural-image models do better on wide images turned tall, ``--tall``: that is their
    weights, not the code; benchmarks/RESULTS.md, *Wide images turned tall*.)"""
    op = {"cs": lambda: operators.make("cs", img_size=(15, 22), ratio=0.3, block=8, mode="permuted", seed=1),
          "inpainting": lambda: operators.make("inpainting", img_size=(13, 20), channels=3, ratio=0.5, seed=2)}[name]()
    channels = op.image_shape[0]
    config = IDMConfig(unet="tiny", image_channels=channels, steps=2, invertible=invertible, final_projection=True)
    model = _transpose_symmetric(perturbed_model(config)).eval()
    assert any(getattr(m, "scale", 0) == 1 for m in model.modules() if hasattr(m, "to_feature"))  # some injectors act
    transpose = next(g for g in DIHEDRAL if torch.equal(g.apply(torch.eye(3, 2)), torch.eye(2, 3)))
    y = op.A(torch.rand(1, *op.image_shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    with torch.no_grad():
        wide = model(y, op)
        tall = transpose.invert(model(y, Transformed(op, transpose)))
    multiple = model.eps_net.unshuffle * 2**model.eps_net.num_downsamplers
    assert op.image_shape[-2] % multiple and not op.image_shape[-1] % multiple  # the U-Net pads the height only
    assert relative_error(tall, wide) < 1e-12
