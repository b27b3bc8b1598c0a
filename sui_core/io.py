"""Atomic artifact writing, metadata beside every output, and the code version that produced it.

Every writer here writes to a temporary file in the destination folder and renames it into place, so a
stage killed mid-write never leaves a file that a later stage would trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sui_core import __version__
from sui_core.errors import ArtifactError, DiskFullError

META_NAME = "meta.json"


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
        os.replace(tmp_path, path)
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except DiskFullError as exc:  # from a file written inside: name it as it would have been in `path`
        inner = Path(getattr(exc, "path", "") or "")
        raise DiskFullError(_disk_full_message(path / inner.relative_to(tmp) if inner.is_relative_to(tmp)
                                               else path)) from exc.__cause__
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota (pyarrow's carries the errno only in its message)."""
    return isinstance(exc, OSError) and (
        exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)
        or "Disk quota exceeded" in str(exc))


def raise_if_disk_full(exc: OSError, path: str | Path) -> None:
    """Raise DiskFullError (one line naming `path`) if `exc` says the disk is full; else return."""
    if is_disk_full(exc):
        error = DiskFullError(_disk_full_message(path))
        error.path = str(path)
        raise error from exc


def _disk_full_message(path: str | Path) -> str:
    return (f"{path}: no space left on device while writing it (partial output removed); "
            f"free disk space, or check what the params need with `sui plan`")


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


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def read_npz(path: str | Path, required: list[str]) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (run the stage that writes it first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in required if k not in z.files]
            if missing:
                raise ArtifactError(f"{path}: missing arrays {missing}")
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: unreadable .npz file ({exc})") from exc


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
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--", "sui_core", "stages"],
                cwd=root, capture_output=True, text=True, timeout=10,
            )
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_meta(out_dir: str | Path, stage: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Write meta.json beside a stage's outputs: the params and seeds it read, and the code version."""
    meta = {"stage": stage, "params": params, "code": code_version(), **extra}
    write_json(Path(out_dir) / META_NAME, meta)
    return meta
