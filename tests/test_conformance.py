"""operators.check_operator: the toolkit's operators keep the operator contract, and a new operator's slips are
named (in Python, and by idm train / idm simulate before they use or record the operator)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import operators
from idm import IDM, IDMConfig
from idm.checkpoint import save_json
from operators import OperatorInputError, check_operator
from operators.conformance import check_plugin_operator
from tests.test_operators import CASES, make


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_toolkit_operator_keeps_the_contract(case):
    check_operator(make(case))  # float64, relative tolerance 1e-9
    check_operator(make(case), dtype=torch.float32)


def test_an_operator_family_keeps_the_contract():
    family = operators.from_config({"name": "family", "components": [
        {"base": {"name": "cs", "img_size": [32, 32], "ratio": 0.2, "mode": "permuted"}, "vary": {"ratio": [0.1, 0.4]}}]})  # fmt: skip
    check_operator(family)


class Scale(operators.Operator):
    """``y = factor * x``: correct as written; the tests below break one part of it at a time."""

    def __init__(self, img_size, channels=1, factor=2.0):
        super().__init__(img_size, channels)
        self.factor = factor

    def measurement_shape(self):
        return self.image_shape

    def A(self, x, **kwargs):
        return x * self.factor

    def A_adjoint(self, y, **kwargs):
        return y * self.factor

    def A_dagger(self, y, **kwargs):
        return y / self.factor

    def config(self):
        return {"name": self.name, "img_size": list(self.img_hw), "channels": self.channels, "factor": self.factor}


def _register(name: str, **methods):
    """A subclass of :class:`Scale` with ``methods`` replaced, registered as ``name``."""
    return operators.register(name)(type(name.replace("-", "_"), (Scale,), methods))


def test_a_correct_new_operator_passes():
    _register("conformance-scale")
    check_operator(operators.make("conformance-scale", img_size=(8, 8), factor=3.0))


BROKEN = {
    "a setting left out of config()": (
        {"config": lambda self: {"name": self.name, "img_size": list(self.img_hw), "channels": self.channels}},
        "the operator rebuilt from config\\(\\) measures differently .* leaves out a setting",
    ),
    "a NumPy number in config()": (
        {"config": lambda self: {**Scale.config(self), "factor": np.float32(self.factor)}},
        "config\\(\\) is not JSON",
    ),
    "A of another shape than measurement_shape()": (
        {"A": lambda self, x, **k: x[..., ::2, ::2] * self.factor},
        "A returned \\(2, 1, 4, 4\\) torch.float(32|64); expected \\(2, 1, 8, 8\\)",
    ),
    "an adjoint that is not one": (
        {"A_adjoint": lambda self, y, **k: y * self.factor + 1},
        "A_adjoint is not the adjoint of A",
    ),
    "a wrong pseudo-inverse": (
        {"A_dagger": lambda self, y, **k: y},
        "A_dagger is not a pseudo-inverse",
    ),
    "a complex A_dagger (an inverse FFT without .real)": (
        {"A_dagger": lambda self, y, **k: torch.fft.ifft2(torch.fft.fft2(y)) / self.factor},
        "A_dagger returned \\(2, 1, 8, 8\\) torch.complex(64|128)",
    ),
    "an A_dagger that fails": (
        {"A_dagger": lambda self, y, **k: y.view(-1, 3)},
        "A_dagger failed on a \\(2, 1, 8, 8\\) torch.float(32|64) input: RuntimeError",
    ),
}


@pytest.mark.parametrize("slip", sorted(BROKEN))
def test_a_broken_new_operator_is_named(slip):
    methods, message = BROKEN[slip]
    name = "conformance-" + "-".join(slip.split()[:4]).replace("(", "").replace(")", "")
    _register(name, **methods)
    op = operators.make(name, img_size=(8, 8), factor=3.0)
    with pytest.raises(OperatorInputError, match=f"the {name} operator breaks the operator contract:\n  - {message}"):
        check_operator(op)
    with pytest.raises(OperatorInputError, match=message):  # what idm train and idm simulate run on a plug-in
        check_plugin_operator(op)


def test_an_approximate_inverse_declared_as_such_passes():
    _register("conformance-approximate", A_dagger=lambda self, y, **k: y, exact_pinv=property(lambda self: False))
    check_operator(operators.make("conformance-approximate", img_size=(8, 8), factor=3.0))


class EvenRows(operators.Operator):
    """``y = x[..., ::2, :]``: its pseudo-inverse puts the rows back with zeros between (``A^T``, as ``A A^T = I``)."""

    name = "conformance-even-rows"

    def measurement_shape(self):
        return (self.channels, (self.img_hw[0] + 1) // 2, self.img_hw[1])

    def A(self, x, **kwargs):
        return x[..., ::2, :]

    def A_adjoint(self, y, **kwargs):
        x = y.new_zeros(*y.shape[:-2], self.img_hw[0], self.img_hw[1])
        x[..., ::2, :] = y
        return x

    def A_dagger(self, y, **kwargs):
        return self.A_adjoint(y)

    def config(self):
        return {"name": self.name, "img_size": list(self.img_hw), "channels": self.channels}


class EvenRowsRepeated(EvenRows):
    """A right inverse that is not the pseudo-inverse: each row repeated (nearest neighbour); ``A A_dagger = I``."""

    def A_dagger(self, y, **kwargs):
        return y.repeat_interleave(2, dim=-2)[..., : self.img_hw[0], :]


def test_a_right_inverse_that_is_not_the_pseudo_inverse_is_named():
    check_operator(EvenRows((8, 8), 1))
    with pytest.raises(OperatorInputError, match="A_dagger A is not symmetric: .* so A_dagger is not the pseudo-inverse"):
        check_operator(EvenRowsRepeated((8, 8), 1))
    check_operator(type("Declared", (EvenRowsRepeated,), {"exact_pinv": property(lambda self: False)})((8, 8), 1))


def test_make_names_a_setting_the_operator_does_not_take():
    with pytest.raises(OperatorInputError, match=r"the 'cs' operator cannot be built from these keyword arguments: .*'ratoi' "
                       r"\(its settings: img_size, channels, ratio, block, mode, seed, phi_seed\)"):  # fmt: skip
        operators.make("cs", img_size=(32, 32), ratoi=0.1)


def test_idm_names_an_a_dagger_of_another_dtype():
    _register("conformance-float64-dagger", A_dagger=lambda self, y, **k: y.double() / self.factor)
    op = operators.make("conformance-float64-dagger", img_size=(16, 16))
    model = IDM(IDMConfig(unet="tiny", steps=1)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="A_dagger returned torch.float64 images from torch.float32 measurements"):
        model(op.A(torch.rand(1, 1, 16, 16)), op)


def test_train_and_simulate_check_a_plugin_operator_before_writing(tmp_path):
    from idm.cli.simulate import OperatorPlan
    from idm.train import TrainConfig, train
    from tasks import Task

    _register("conformance-forgets-factor", config=BROKEN["a setting left out of config()"][0]["config"])
    op = operators.make("conformance-forgets-factor", img_size=(16, 16), factor=3.0)
    config = TrainConfig(iters=1, batch_size=1, num_workers=0, progress=False)
    with pytest.raises(OperatorInputError, match="leaves out a setting"):
        train(IDMConfig(unet="tiny", steps=1), [torch.rand(1, 16, 16)], op, tmp_path / "run", config, say=lambda _: None)
    assert not (tmp_path / "run").exists()
    task = Task(name="conformance", operator="conformance-forgets-factor", operator_defaults={"factor": 3.0})
    with pytest.raises(OperatorInputError, match="leaves out a setting"):
        OperatorPlan(task, {}, None, seed=0).operator(0, (16, 16))


def test_save_json_names_a_value_that_is_not_json(tmp_path):
    with pytest.raises(ValueError, match="config.json.*not JSON .*int64"):
        save_json({"factor": np.int64(2)}, tmp_path / "config.json")
    assert not list(tmp_path.iterdir())


def test_a_training_family_of_a_plugin_operator_is_checked_before_its_config_stands_for_it():
    """A family's base operators are rebuilt from configs, so a setting that config() leaves out would be lost
    silently: make_training_operator checks the operator first."""
    from tasks import Task

    class ScaleWithGain(Scale):
        def __init__(self, img_size, channels=1, factor=2.0, gain=1.0):
            super().__init__(img_size, channels, factor)
            self.gain = gain

        def config(self):  # records the gain that the family varies, forgets the factor
            return {"name": self.name, "img_size": list(self.img_hw), "channels": self.channels, "gain": self.gain}

    operators.register("conformance-family-forgets")(ScaleWithGain)
    task = Task(name="conformance-family", operator="conformance-family-forgets", options=("factor", "gain"))
    with pytest.raises(OperatorInputError, match="leaves out a setting"):
        task.make_training_operator(16, gain=(1.0, 3.0), factor=3.0)


def test_an_unregistered_operator_is_checked_but_for_its_config_round_trip():
    """An Operator subclass used from Python only (no @operators.register): no file or checkpoint can rebuild it,
    so the round trip is not asked of it; a measurement_shape() that fails is named, not raised."""
    loose = type("Loose", (Scale,), {"config": lambda self: {"name": self.name}})(img_size=(8, 8))
    check_plugin_operator(loose)
    shapeless = type("Shapeless", (Scale,), {"measurement_shape": operators.Operator.measurement_shape})(img_size=(8, 8))
    with pytest.raises(OperatorInputError, match="measurement_shape\\(\\) failed: NotImplementedError"):
        check_operator(shapeless)
