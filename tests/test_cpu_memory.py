"""idm.cpu_memory: glibc keeps freed tensor memory, so repeated large allocations stop faulting in pages.

The setting is process-wide, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from idm import cpu_memory
from idm.cpu_memory import keep_freed_memory

# Mallocs, fills and frees a 48 MiB block 10 times (above glibc's largest dynamic mmap threshold, 32 MiB;
# torch's CPU tensors come from the same malloc) and prints whether the setting was applied and the
# minor page faults of the loop. The module is loaded from its file: importing the idm package takes seconds.
_PROBE = """
import ctypes, ctypes.util, importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("cpu_memory", sys.argv[2])
cpu_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_memory)
applied = cpu_memory.keep_freed_memory() if sys.argv[1] == "kept" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def fill_and_free():
    block = libc.malloc(48 << 20)
    ctypes.memset(block, 1, 48 << 20)
    libc.free(block)
fill_and_free()  # the first block faults in either case
before = faults()
for _ in range(10):
    fill_and_free()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-c", _PROBE, mode, cpu_memory.__file__], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default = _probe("glibc")
    kept = _probe("kept")
    assert kept["applied"] is True
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert default["faults"] >= 5 * pages  # glibc maps and zeroes each 48 MiB block anew
    assert kept["faults"] < pages  # the same block is reused: at most a fraction of one block's pages


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_the_users_own_glibc_tuning_wins():
    assert _probe("kept", {"MALLOC_MMAP_THRESHOLD_": "131072"})["applied"] is False


@pytest.mark.parametrize("kept_bytes", [0, -1, 1 << 31])
def test_kept_bytes_out_of_mallopts_range_is_refused(kept_bytes):
    with pytest.raises(ValueError, match="kept_bytes"):
        keep_freed_memory(kept_bytes)


@pytest.mark.parametrize(("device", "calls"), [("cpu", 1), ("cuda", 0)])
def test_idm_commands_keep_freed_memory_on_the_cpu_only(monkeypatch, tmp_path, device, calls):
    from idm import cli

    made = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: made.append(device))
    cli.main(["info", "--device", device, "--out", str(tmp_path / "info.json")])  # without CUDA: a clear error, status 2
    assert len(made) == calls


@pytest.mark.shipped
def test_malloc_benchmark_measures_each_run_and_summarises_both_settings():
    from benchmarks import cpu_malloc

    rows = cpu_malloc.measure("cs-10", "glibc", size=32, precision="fp32", runs=2, warmup=0)  # glibc: changes nothing
    assert [r["run"] for r in rows] == [0, 1]
    assert all(r["ms"] > 0 and r["page_faults"] >= 0 and r["system_s"] >= 0 and r["peak_rss_mb"] > 0 for r in rows)
    table = cpu_malloc.summary_markdown([
        {"malloc": "glibc", "ms": 10.0, "page_faults": 100, "system_s": 0.2, "peak_rss_mb": 900},
        {"malloc": "glibc", "ms": 14.0, "page_faults": 300, "system_s": 0.4, "peak_rss_mb": 950},
        {"malloc": "kept", "ms": 8.0, "page_faults": 0, "system_s": 0.0, "peak_rss_mb": 990},
    ])  # fmt: skip
    assert "| glibc | 2 | 10 | 12 | 200 | 0.300 | 950 |" in table and "| kept | 1 | 8 | 8 | 0 | 0.000 | 990 |" in table
