"""The CPU memory column of `idm benchmark`: a block's peak resident memory (Linux)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import resident_memory
from benchmarks.resident_memory import ResidentPeak

pytestmark = pytest.mark.skipif(not resident_memory.available(), reason="needs Linux's /proc/self/clear_refs")


def test_a_block_that_touches_memory_is_measured_even_where_the_heap_kept_freed_memory():
    """64 MiB written in the block count; they count again in a second block that reuses the memory the first
    freed (the heap's freed memory is handed back before each block), and a block that allocates nothing
    measures about nothing."""
    from idm.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as every idm command on the CPU: freed blocks stay in the heap
    sizes = []
    for _ in range(2):
        with ResidentPeak() as peak:
            block = torch.ones(16 * 2**20)  # 64 MiB, written
            del block
        sizes.append(peak.mib)
    with ResidentPeak() as idle:
        pass
    assert all(60 <= size < 200 for size in sizes), sizes
    assert idle.mib < 8


def test_the_benchmark_records_each_methods_peak_on_the_cpu(tmp_path):
    """results.csv has a peak_mem_mb for every method on the CPU, and benchmark.json says what it means."""
    import csv
    import json

    import numpy as np
    from PIL import Image

    from idm.cli import main

    (tmp_path / "data").mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / "data" / f"{i}.png")
    from idm import IDM, IDMConfig

    IDM(IDMConfig(unet="tiny", steps=1)).save_pretrained(tmp_path / "model")
    assert main(["benchmark", "--task", "cs", "--ratio", "0.25", "--block", "8", "--data", str(tmp_path / "data"),
                 "--checkpoint", str(tmp_path / "model"), "--methods", "idm,pinv,tv", "--tv-iters", "5", "--device", "cpu",
                 "--no-images", "--no-progress", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == 6 and all(row["peak_mem_mb"] != "" for row in rows)
    assert all(float(row["peak_mem_mb"]) > 1 for row in rows if row["method"] == "idm")  # its feature maps, at least
    assert "resident" in json.loads((tmp_path / "out" / "benchmark.json").read_text())["peak_memory"]
    assert "peak MiB" in (tmp_path / "out" / "summary.md").read_text()
