"""Hardware names in provenance records and benchmark tables."""

from __future__ import annotations

import json

import pytest
import torch

from idm.hardware import cpu_bf16_units, cpu_details, hardware_name, has_native_bf16
from idm.precision import resolve_precision


def test_cpu_details_name_the_model_and_its_bf16_units(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9554\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9554\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    )
    assert cpu_details(cpuinfo) == ["AMD EPYC 9554", "AVX512-BF16"]
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2\n")
    assert cpu_details(cpuinfo) == ["Some CPU"]
    cpuinfo.write_text("cpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t\t: avx512_bf16\n")
    assert cpu_details(cpuinfo) == ["AMD EPYC", "family 26 model 2", "AVX512-BF16"]  # a generic name: which generation
    cpuinfo.write_text("cpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n")
    assert cpu_details(cpuinfo) == ["Intel(R) Xeon(R) CPU @ 2.20GHz", "family 6 model 85"]  # a clock is no model number
    assert cpu_details(tmp_path / "missing") == []


def test_hardware_name_of_the_cpu():
    name = hardware_name(torch.device("cpu"))
    assert name.startswith("CPU, ") and " cores (" in name


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel Xeon\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_bf16_units(cpuinfo) == ["AMX-BF16"] and has_native_bf16(torch.device("cpu"), cpuinfo)
    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n")  # oneDNN would emulate bf16 here
    assert cpu_bf16_units(cpuinfo) == [] and not has_native_bf16(torch.device("cpu"), cpuinfo)
    assert not has_native_bf16(torch.device("cpu"), tmp_path / "missing")  # unknown: assume emulated
    assert not has_native_bf16(torch.device("meta"))


def test_auto_precision_is_bf16_exactly_where_it_is_native(monkeypatch):
    native = {"cpu": False}
    monkeypatch.setattr("idm.hardware.has_native_bf16", lambda device: native[device.type])
    assert resolve_precision("auto", "cpu") == "fp32"
    native["cpu"] = True
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"  # asked for: kept
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16; got 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_idm_info_says_what_auto_precision_runs(monkeypatch, tmp_path, capsys):
    from idm.cli import main

    monkeypatch.setattr("idm.hardware.has_native_bf16", lambda device: True)
    assert main(["info", "--device", "cpu", "--out", str(tmp_path / "info.json")]) == 0
    assert "--precision auto runs bf16 on cpu" in capsys.readouterr().out
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["precision_auto"] == "bf16" and info["hardware"].startswith("CPU, ")


def test_device_flags_name_what_this_machine_lacks(monkeypatch):
    from idm.cli.common import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"--device cuda:5: this machine has 1 CUDA device\(s\), numbered from 0"):
        resolve_device("cuda:5")
    with pytest.raises(ValueError, match="--device meta: meta tensors hold no values"):
        resolve_device("meta")
    if not torch.backends.mps.is_available():  # a backend torch knows but this build or machine lacks
        with pytest.raises(ValueError, match="--device mps is not usable with this torch build: .*\\(use cpu or cuda\\)$"):
            resolve_device("mps")
    real_empty = torch.empty

    def no_backend_module(*args, **kwargs):  # torch's own error where a backend's module is not built in (hpu)
        if str(kwargs.get("device", "")).startswith("hpu"):
            raise ModuleNotFoundError("No module named 'torch.hpu'")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_backend_module)
    with pytest.raises(ValueError, match=r"--device hpu is not usable with this torch build: No module named 'torch.hpu'"):
        resolve_device("hpu")


def test_running_out_of_memory_is_an_error_that_names_the_size_not_a_traceback(capsys):
    from idm.cli.common import out_of_memory_message, run_guarded

    assert run_guarded(lambda: torch.empty(2**62, dtype=torch.uint8), "idm simulate") == 2  # torch's CPU allocator
    err = capsys.readouterr().err
    assert err.startswith("idm simulate: error: out of memory: an allocation of 4294967296.0 GiB failed; try smaller")
    assert out_of_memory_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")) == (
        "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB; try smaller images (--size), a smaller batch, "
        "or another --device")
    with pytest.raises(RuntimeError, match="a bug"):  # other errors keep their traceback
        run_guarded(lambda: (_ for _ in ()).throw(RuntimeError("a bug")), "idm simulate")
