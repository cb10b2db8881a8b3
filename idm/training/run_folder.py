"""The ``--out`` folder of a training run: run config, resume checks, atomic checkpoints.

Layout::

    OUT/config.json                  the run's full config (JSON; written when the run starts)
    OUT/log.csv                      iteration,loss,lr,val_psnr,seconds
    OUT/checkpoints/iter_0000100/    one complete checkpoint (the files depend on the trainer)
    OUT/checkpoints/iter_0000200/    ... the last ``keep`` are kept

A checkpoint folder is written under a hidden temporary name
(``.tmp-iter_...``) inside ``checkpoints/``, every file flushed to disk, and
then renamed into place in one atomic step: an ``iter_*`` folder is always
complete, and a crash mid-write leaves the previous checkpoints untouched.
The latest checkpoint is the ``iter_*`` folder with the highest number.

A run config has two parts: ``identity`` (what must not change when a run is
resumed: task, operator, model, batch size, learning-rate schedule, seed, ...)
and ``settings`` (what may: ``--iters``, ``--max-minutes``, cadences, device,
number of processes). :meth:`RunFolder.prepare` compares identities and
refuses a mismatch with a message naming every differing field, before
anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

from idm.checkpoint import CheckpointError, load_json, process_umask, save_json
from idm.training.csv_log import CsvLog
from idm.training.state import resuming_from

CONFIG_NAME = "config.json"
LOG_NAME = "log.csv"
CHECKPOINTS = "checkpoints"
RUN_NAME = "run.json"  # inside every checkpoint: the run config it was written with
LOCK_NAME = ".lock"  # held by the process that runs the run (RunFolder.begin)
_CKPT_RE = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _normalise(obj: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable ``"key: saved -> current"`` lines for every differing leaf."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)  # an absent key reads as null (fields added later)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, prefix=f"{name}."))
        elif a != b:
            show = lambda v: json.dumps(v) if len(json.dumps(v)) <= 80 else json.dumps(v)[:77] + "..."  # noqa: E731
            out.append(f"{name}: {show(a)} in the run, {show(b)} now")
    return out


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh hidden folder in ``parent`` with the usual permissions (``mkdtemp`` makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~process_umask())
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunFolder:
    """Files of one run in ``out`` (see the module docstring). ``kind`` names the trainer; ``outputs`` names what
    else it writes into ``out`` (``idm pretrain``: its exported ``prior/``)."""

    def __init__(self, out: str | os.PathLike, kind: str, outputs: tuple[str, ...] = ()):
        self.out = Path(out)
        self.kind = kind
        self.outputs = tuple(outputs)
        self._lock: Any = None  # the open lock file while :meth:`begin`'s run holds the folder

    @property
    def written_names(self) -> tuple[str, ...]:
        """The names the run writes into ``out``: a folder that is no run folder must not hold them."""
        return (CONFIG_NAME, LOG_NAME, CHECKPOINTS, *self.outputs)

    @property
    def config_path(self) -> Path:
        return self.out / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self.out / LOG_NAME

    @property
    def checkpoints_dir(self) -> Path:
        return self.out / CHECKPOINTS

    # ---- reading -------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints ``(iteration, folder)``, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def read_config(self, path: Path | None = None) -> dict[str, Any]:
        path = path or self.config_path
        cfg = load_json(path, "run config")
        if not isinstance(cfg, dict) or cfg.get("format") != self.kind:
            raise CheckpointError(
                f"{path} is not the config of an '{self.kind}' run (format {cfg.get('format') if isinstance(cfg, dict) else None!r})"
            )
        wrong = [part for part in ("identity", "settings") if not isinstance(cfg.get(part, {}), dict)]
        if wrong:
            raise CheckpointError(f"{path}: its {' and '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a JSON object")
        return cfg

    # ---- starting / resuming -------------------------------------------------------
    def prepare(
        self,
        identity: dict[str, Any],
        resume: bool,
        hints: dict[str, str] | None = None,
        recorded_identity: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        lock: bool = False,
    ) -> Path | None:
        """Check that the run may use ``out``; return the checkpoint to resume from (``None``: fresh start).

        With ``lock`` (the process that will write the run), an existing run's folder is locked before its
        checkpoints are read (see :meth:`begin`; :meth:`unlock` gives it back), so that no other process writes
        a newer checkpoint in between; a folder without a run yet is locked by :meth:`begin`.

        Writes nothing (it only probes that ``checkpoints/`` takes a new folder). Raises
        :class:`CheckpointError` when another process holds the run's lock, when ``checkpoints/`` is
        not a writable folder, when ``out`` holds outputs of a run (:attr:`outputs`) but no checkpoint,
        when ``out`` holds
        checkpoints and ``resume`` is false, when a resumed run's identity
        differs from ``identity``, or when ``out`` is not a run folder of this
        kind (another config, or no config and no checkpoint but files of
        the names a run writes: :attr:`written_names`).
        ``hints`` maps a field name (last part of the dotted key) to advice
        added to the message when that field differs. ``recorded_identity``
        reads the identity out of a saved run config (default: its
        ``"identity"``), e.g. to fill in fields that older runs recorded elsewhere.
        """
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"--out {str(self.out)!r} exists and is not a folder")
        self._check_checkpoints_writable()
        found = self.checkpoints()
        if found:
            self._check_kind_of_checkpoints(found[-1][1] / RUN_NAME)
        has_config = self.config_path.is_file()
        if has_config:
            try:
                saved = self.read_config()
            except CheckpointError as err:
                if found and _json_object(self.config_path) is None:  # damaged, not another run's: the checkpoints hold it
                    raise CheckpointError(
                        f"{str(self.config_path)!r} is damaged ({err}); the run's checkpoints keep its config "
                        f"({found[-1][1].name}/{RUN_NAME}), so deleting that file loses nothing and lets --resume go on"
                    ) from None
                raise CheckpointError(f"--out {str(self.out)!r} already holds another config.json ({err}); choose another --out") from None
        if lock and (has_config or found):  # a run of this kind: no other process may write it from now on
            self._take_lock()
        try:
            found = self.checkpoints() if self._lock is not None else found  # as they are, now none else writes them
            return self._choose(found, saved if has_config else None, identity, resume, hints, recorded_identity)
        except BaseException:
            self.unlock()
            raise

    def _choose(self, found: list[tuple[int, Path]], saved: dict[str, Any] | None, identity: dict[str, Any], resume: bool,
                hints: dict[str, str] | None, recorded_identity: Callable[[dict[str, Any]], dict[str, Any]] | None) -> Path | None:  # fmt: skip
        """:meth:`prepare`'s checks of the run in ``out`` (``found``: its checkpoints; ``saved``: its config)."""
        has_config = saved is not None
        left = [name for name in self.outputs if (self.out / name).exists()]
        if left and not found:  # its checkpoints were deleted: a fresh start would overwrite what the run made
            raise CheckpointError(f"--out {str(self.out)!r} holds {', '.join(left)} from an earlier run, but no checkpoint "
                                  "to resume it from; a new run there would overwrite it: choose another folder, or "
                                  "move it away first (nothing was overwritten)")  # fmt: skip
        if not has_config and not found:  # not a run folder: the names the run writes must be free
            taken = sorted(name for name in self.written_names if (self.out / name).exists())
            if taken:
                raise CheckpointError(f"--out {str(self.out)!r} is not a run folder (no {CONFIG_NAME}, no checkpoint), "
                                      f"but holds {', '.join(taken)}, which the run would overwrite: choose another "
                                      "folder (nothing was overwritten)")  # fmt: skip
        if not resume:
            if found:
                raise CheckpointError(
                    f"--out {str(self.out)!r} already holds a run with checkpoints (latest {found[-1][1].name}); "
                    "pass --resume to continue it, or choose another --out (nothing was overwritten)"
                )
            return None
        read = recorded_identity or (lambda run: run.get("identity", {}))
        if not found:
            if has_config:
                self._check_identity(read(saved), identity, self.config_path, hints)
            return None
        latest = found[-1][1]
        with resuming_from(latest):  # a checkpoint without its run.json is damaged: say how to fall back
            run = self.read_config(latest / RUN_NAME)
        self._check_identity(read(run), identity, latest, hints)
        return latest

    def _check_kind_of_checkpoints(self, record: Path) -> None:
        """A :class:`CheckpointError` when the latest checkpoint's readable ``run.json`` is of another kind of run
        (an ``idm pretrain`` folder given to ``idm train``): not damage, so the message must not say to delete it."""
        recorded = (_json_object(record) or {}).get("format")
        if isinstance(recorded, str) and recorded != self.kind:
            raise CheckpointError(
                f"--out {str(self.out)!r} holds checkpoints of another kind of run ({record.parent.name}/{RUN_NAME}: "
                f"format {recorded!r}, not {self.kind!r}): choose another --out (nothing was overwritten)"
            )

    def _check_checkpoints_writable(self) -> None:
        """A :class:`CheckpointError` now, not after a chunk of training, when ``checkpoints/`` is not a folder
        or does not take a new one (probed with an empty hidden folder, removed at once)."""
        ckdir = self.checkpoints_dir
        if ckdir.exists() and not ckdir.is_dir():
            raise CheckpointError(f"{str(ckdir)!r} is not a folder: the run writes its checkpoints there (nothing was overwritten)")
        if ckdir.is_dir():
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".tmp-probe-", dir=ckdir))
            except FileNotFoundError:  # made, then cleaned up as a leftover by the process that runs the run
                pass
            except OSError as err:
                raise CheckpointError(f"cannot write checkpoints into {str(ckdir)!r}: {err.strerror or err}") from None

    def _check_identity(self, saved: dict[str, Any], current: dict[str, Any], where: Path, hints: dict[str, str] | None) -> None:
        diffs = config_differences(_normalise(saved), _normalise(current))
        for key, hint in (hints or {}).items():
            if any(d.split(":", 1)[0].split(".")[-1] == key for d in diffs):
                diffs.append(hint)
        if diffs:
            raise CheckpointError(
                f"--resume: the run in {str(self.out)!r} ({where.name}) was started with a different configuration:\n  "
                + "\n  ".join(diffs)
                + "\nresume with the original options, or choose another --out (nothing was overwritten)"
            )

    def write_config(self, config: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_json({"format": self.kind, **config}, self.config_path)

    def begin(
        self, config: dict[str, Any], resumed: Path | None, start: int, iters: int, say: Callable[[str], None]
    ) -> CsvLog:
        """Start (or continue, from checkpoint ``resumed`` at iteration ``start``) a run on rank 0.

        Takes the folder's lock first (:meth:`unlock` gives it back; so does the
        end of the process), so that a second process on the same run, such as
        a requeued job that overlaps the first, stops with a clear error instead
        of writing the same checkpoints and log rows; then opens ``log.csv``
        (keeping the rows up to ``start`` when resuming), writes ``config.json`` and
        says where a resumed run continues.
        """
        self._take_lock()
        if self.latest() != resumed:  # written by another process before this one held the lock
            self.unlock()
            raise CheckpointError(f"another process wrote {self.latest()} in {str(self.out)!r} while this one started: "
                                  "rerun with --resume to continue from it (nothing was written)")  # fmt: skip
        log = CsvLog(self.log_path)
        log.start(start if resumed is not None else None)  # first: a log it cannot read stops the start unchanged
        self.write_config(config)
        if resumed is not None:
            say(f"resuming {self.out} from {resumed.name} (iteration {start} of {iters})")
        return log

    def _take_lock(self) -> None:
        """An exclusive ``flock`` on ``out/.lock``, held while the file stays open (POSIX; where the file
        system or platform has no locks, runs go unguarded)."""
        if fcntl is None or self._lock is not None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / LOCK_NAME, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise CheckpointError(f"another process is running the run in {str(self.out)!r} (a job still running, or "
                                  "started twice): wait for it to stop, or use another --out (nothing was written)") from None  # fmt: skip
        except OSError:  # a file system without locks
            handle.close()
            return
        self._lock = handle

    def unlock(self) -> None:
        """Give back the lock :meth:`prepare` or :meth:`begin` took (nothing when it holds none)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self, iteration: int, write: Callable[[Path], None], run_config: dict[str, Any], keep: int) -> Path:
        """Write a checkpoint atomically: ``write(tmp_folder)`` fills it, then it is renamed into place.

        ``run_config`` is stored as ``run.json`` inside it. The oldest
        checkpoints beyond the newest ``keep`` are then deleted.
        """
        ckdir = self.checkpoints_dir
        ckdir.mkdir(parents=True, exist_ok=True)
        final = ckdir / checkpoint_name(iteration)
        tmp = _make_temp_dir(ckdir, f".tmp-{final.name}-")
        try:
            write(tmp)
            save_json({"format": self.kind, **run_config}, tmp / RUN_NAME)
            _fsync_dir(tmp)
            if final.exists():  # e.g. re-reached after resuming from an older checkpoint
                old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=ckdir))
                os.replace(final, old / final.name)
            os.replace(tmp, final)
            _fsync_dir(ckdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(keep)
        return final

    def _prune(self, keep: int) -> None:
        for _, path in self.checkpoints()[: -max(1, keep)]:
            _remove_folder(path)
        _remove_leftovers(self.checkpoints_dir)  # of interrupted writes and prunes (only rank 0 writes here)


def _remove_folder(path: Path) -> None:
    """Delete the folder ``path`` as one step for its readers: it is renamed to a hidden ``.old-`` name first, so
    that a process killed while deleting leaves no part of it under its own name (:func:`_remove_leftovers`
    deletes the rest later)."""
    hidden = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
    os.replace(path, hidden / path.name)
    shutil.rmtree(hidden, ignore_errors=True)


def _remove_leftovers(parent: Path, name: str | None = None) -> None:
    """Delete the hidden folders that interrupted writes and deletions of this module left in ``parent``:
    ``.tmp-NAME-XXXXXXXX`` / ``.old-NAME-XXXXXXXX`` (``tempfile.mkdtemp``'s 8 random characters), exactly, so
    that another folder's (``NAME-2``) are left alone; ``name=None``: every ``.tmp-`` / ``.old-`` folder (a
    checkpoints folder, which only this run writes)."""
    pattern = re.compile(r"\.(tmp|old)-" + (re.escape(name) + r"-[a-z0-9_]{8}$" if name is not None else ""))
    for p in parent.iterdir():
        if pattern.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when it is missing, unreadable, not JSON or not an object."""
    try:
        recorded = load_json(path, "run config")
    except CheckpointError:
        return None
    return recorded if isinstance(recorded, dict) else None


def replace_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder atomically next to ``final`` with ``write(tmp)``, then swap it in.

    A crash leaves either the previous ``final`` or the new one in place (or,
    between the two renames, the previous one under a hidden ``.old-`` name,
    which the next call removes with the other leftovers of interrupted calls).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final.parent, final.name)
    tmp = _make_temp_dir(final.parent, f".tmp-{final.name}-")
    try:
        write(tmp)
        mode = 0o666 & ~process_umask()  # as any new file: some writers (safetensors through diffusers) make theirs 0600
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, mode)
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
