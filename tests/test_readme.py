"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_install_and_test_commands_that_ci_runs():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).strip().splitlines()
    assert 'pip install -e ".[dev]"' in first_block[0] and first_block[0].endswith("&& idm demo")
    assert first_block[1].startswith("python -m pytest -q")
    ci = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()]
    assert 'pip install -q -e ".[dev]"' in ci and "idm demo" in ci and ci[-1] == first_block[1]


def test_readme_python_examples_run(tmp_path):
    blocks = _python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "decimate: (1, 1, 16, 16) -> (1, 1, 32, 32)" in result.stdout
