"""Atomic artifact writing and reading, and the code version (recorded by the pipeline outside the outputs).

Every writer here writes to a temporary file in the destination folder and renames it into place, so a
stage killed mid-write never leaves a file that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sui_core import __version__
from sui_core.errors import ArtifactError, DiskFullError

_PUBLISH_CHECKS: list[Callable[[], None]] = []


@contextlib.contextmanager
def checked_publish(check: Callable[[], None]) -> Iterator[None]:
    """Inside the block, `check()` runs right before `atomic_path`/`atomic_dir` rename anything into
    place; when it raises, nothing is published (the temporary output is removed). The pipeline uses it
    to refuse outputs whose params changed while the stage ran."""
    _PUBLISH_CHECKS.append(check)
    try:
        yield
    finally:
        _PUBLISH_CHECKS.remove(check)


def _before_publish() -> None:
    for check in list(_PUBLISH_CHECKS):
        check()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _before_publish()
        os.replace(tmp_path, path)
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; on success it replaces `path` as a whole.

    Temporary folders of `path` left by writers that died (SIGKILL, power loss) are removed first; those
    of live writers are left alone (`remove_stale_temp_dirs`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(path)
    with _locked_temp_dir(path) as tmp:
        try:
            yield tmp
            _before_publish()
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except DiskFullError as exc:  # from a file written inside: name it as it would have been in `path`
            inner = Path(getattr(exc, "path", "") or "")
            raise DiskFullError(
                _disk_full_message(path / inner.relative_to(tmp) if inner.is_relative_to(tmp) else path)
            ) from exc.__cause__
        except OSError as exc:
            raise_if_disk_full(exc, path)
            raise


TEMP_LOCK_SUFFIX = ".lock"
UNLOCKED_GRACE_S = 60.0  # a temporary folder without a lock file this young may be one being set up
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP)  # flock unsupported by the file system


@contextlib.contextmanager
def _locked_temp_dir(path: Path) -> Iterator[Path]:
    """A new folder `.<name>.XXXXXXXX.tmp` next to `path`, removed after the block if still there.

    Its sibling `<folder>.lock` carries an exclusive flock held until the folder is renamed or removed.
    The OS drops the lock when the process dies, SIGKILL included, so a cleaner that can take the lock
    knows the writer is gone: unlike a pid in a file, this cannot be fooled by pid reuse. The lock file
    is locked under another name first and renamed into place, so no cleaner ever takes it before us."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    lock_path = tmp.with_name(tmp.name + TEMP_LOCK_SUFFIX)
    fresh = tmp.with_name(lock_path.name + ".new")  # a name cleaners ignore
    fd = None
    try:
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks: cleaners cannot lock it either, so keep it
            if exc.errno not in NO_LOCKS:
                raise
        os.replace(fresh, lock_path)
        yield tmp
    finally:
        if tmp.exists():  # removed while still locked
            shutil.rmtree(tmp)
        lock_path.unlink(missing_ok=True)
        fresh.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)


def remove_stale_temp_dirs(path: str | Path) -> list[Path]:
    """Remove the temporary folders of `path` (and their lock files) whose writer is gone; return them.

    A folder is stale when its lock can be taken without blocking (its writer died, e.g. SIGKILLed), or
    when it has no lock file and is older than UNLOCKED_GRACE_S (left by code without locks, or by a
    writer killed between making the folder and locking it). A folder whose writer is alive is never
    touched, and neither is anything of another output (`prepared.json`'s temps for `prepared`)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp({re.escape(TEMP_LOCK_SUFFIX)})?")
    try:
        siblings = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]
    except FileNotFoundError:
        return []
    temps = {p.with_name(p.name.removesuffix(TEMP_LOCK_SUFFIX)) for p in siblings}
    return [tmp for tmp in sorted(temps) if _remove_if_stale(tmp)]


def _remove_if_stale(tmp: Path) -> bool:
    """Remove `tmp` and its lock file if no live writer holds the lock (see remove_stale_temp_dirs)."""
    lock_path = tmp.with_name(tmp.name + TEMP_LOCK_SUFFIX)
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except PermissionError:
        return False  # another user's: not ours to judge
    except FileNotFoundError:
        try:
            age = time.time() - tmp.lstat().st_mtime
        except FileNotFoundError:
            return False
        if age < UNLOCKED_GRACE_S or not tmp.is_dir():
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:  # BlockingIOError: its writer is alive; else no locks here: cannot judge
        os.close(fd)
        if isinstance(exc, BlockingIOError) or exc.errno in NO_LOCKS:
            return False
        raise
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota (pyarrow's carries the errno only in its message)."""
    return isinstance(exc, OSError) and (
        exc.errno in (errno.ENOSPC, errno.EDQUOT)
        or "No space left on device" in str(exc)
        or "Disk quota exceeded" in str(exc)
    )


def raise_if_disk_full(exc: OSError, path: str | Path) -> None:
    """Raise DiskFullError (one line naming `path`) if `exc` says the disk is full; else return."""
    if is_disk_full(exc):
        error = DiskFullError(_disk_full_message(path))
        error.path = str(path)
        raise error from exc


def _disk_full_message(path: str | Path) -> str:
    return (
        f"{path}: no space left on device while writing it (partial output removed); "
        f"free disk space, or check what the params need with `sui plan`"
    )


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run the stage that writes it first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_parquet(path: str | Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run the stage that writes it first)")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: unreadable Parquet file ({exc})") from exc


def parquet_columns(path: str | Path) -> list[str]:
    """The column names of a Parquet file, from its footer (no data read)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run the stage that writes it first)")
    try:
        return pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: unreadable Parquet file ({exc})") from exc


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def read_npz(path: str | Path, required: list[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run the stage that writes it first)")
    if not _looks_like_zip(path):  # else np.load would try it as a pickle and say so
        raise ArtifactError(f"{path}: not an .npz archive (truncated or corrupted); rerun the stage that writes it")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z.files]
            if missing:
                raise ArtifactError(f"{path}: missing arrays {missing}")
            return {k: z[k] for k in z.files}  # read whole: zipfile checks each array's CRC-32
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ArtifactError(f"{path}: unreadable .npz file ({exc}); rerun the stage that writes it") from exc


def _looks_like_zip(path: Path) -> bool:
    """Starts with a zip local-file header and ends with a zip directory (npz files do both)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04" and zipfile.is_zipfile(fh)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> dict[str, Any]:
    """What code produced an artifact: package version, git commit (and whether the tree was dirty)."""
    root = Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {"sui_version": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--", "sui_core", "stages"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info
