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

from idm.checkpoint import CheckpointError, atomic_write

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
        rows = self._rows_up_to(resume_iteration) if resume_iteration is not None and self.path.is_file() else []
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(rows)
        text = buffer.getvalue()
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def _rows_up_to(self, iteration: int) -> list[list[str]]:
        """The existing log's rows up to ``iteration`` (none if its header is another); a
        :class:`CheckpointError` naming the file when it is not text CSV (the log of a resumed run is kept, so
        it is not silently dropped)."""
        rows: list[list[str]] = []
        try:
            with open(self.path, newline="") as handle:
                reader = csv.reader(handle)
                if next(reader, None) != list(self.columns):
                    return rows
                for row in reader:  # a row cut short by a crash mid-write is dropped
                    try:
                        if len(row) == len(self.columns) and int(row[0]) <= iteration:
                            rows.append(row)
                    except ValueError:
                        continue
        except (UnicodeDecodeError, csv.Error) as err:
            raise CheckpointError(
                f"the run's log {str(self.path)!r} is not a readable CSV file ({err}); move it away to resume with "
                "a new log (the checkpoints are intact)"
            ) from None
        return rows

    def append(self, **values: Any) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"unknown log column(s): {', '.join(sorted(unknown))}")
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerow([_fmt(values.get(c)) for c in self.columns])
