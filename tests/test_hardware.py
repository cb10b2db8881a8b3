"""Hardware names in provenance records and benchmark tables."""

from __future__ import annotations

import torch

from idm.hardware import cpu_details, hardware_name


def test_cpu_details_name_the_model_and_its_bf16_units(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9554\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9554\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    )
    assert cpu_details(cpuinfo) == ["AMD EPYC 9554", "AVX512-BF16"]
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2\n")
    assert cpu_details(cpuinfo) == ["Some CPU"]
    assert cpu_details(tmp_path / "missing") == []


def test_hardware_name_of_the_cpu():
    name = hardware_name(torch.device("cpu"))
    assert name.startswith("CPU, ") and " cores (" in name
