"""``log.csv``: one row per logged iteration, columns ``iteration,loss,lr,val_psnr,seconds``.

``loss`` is the mean training loss since the previous row (over all
processes), ``lr`` the base learning rate of that iteration, ``val_psnr``
the mean validation PSNR in dB (empty when not evaluated), ``seconds`` the
training wall-clock time accumulated over all chunks of the run. On resume
the rows after the checkpoint's iteration are dropped, so the log of a
resumed run reads like one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from idm.checkpoint import atomic_write

COLUMNS: tuple[str, ...] = ("iteration", "loss", "lr", "val_psnr", "seconds")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".8g")
    return str(value)


class CsvLog:
    """Append-only CSV log at ``path`` (written by rank 0 only)."""

    def __init__(self, path: str | Path, columns: tuple[str, ...] = COLUMNS):
        self.path = Path(path)
        self.columns = columns

    def start(self, resume_iteration: int | None) -> None:
        """New log (``None``), or keep the rows up to ``resume_iteration`` of an existing one."""
        rows: list[list[str]] = []
        if resume_iteration is not None and self.path.is_file():
            with open(self.path, newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                if header == list(self.columns):
                    for row in reader:  # a row cut short by a crash mid-write is dropped
                        try:
                            if len(row) == len(self.columns) and int(row[0]) <= resume_iteration:
                                rows.append(row)
                        except ValueError:
                            continue
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(rows)
        text = buffer.getvalue()
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def append(self, **values: Any) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"unknown log column(s): {', '.join(sorted(unknown))}")
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerow([_fmt(values.get(c)) for c in self.columns])
