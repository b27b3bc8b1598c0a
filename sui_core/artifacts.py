"""The on-disk contract of every stage output folder: what made it, and a hash of every file in it.

Each stage writes its outputs into one folder (`atomic_dir`) and, last, `publish`es it: `meta.json` is
written beside the files, holding

    stage     the stage that wrote it
    params    the params this output depends on: the keys DVC tracks for the stage, as the stage
              validated them (defaults filled in), {section: {key: value}}
    lineage   those params flattened (`training.t`), merged with the lineage of every input the stage
              read: every param the content depends on, however far upstream
    files     {relative path: sha256} of every other file in the folder
    ...       whatever the stage adds (shapes, summaries)

A stage reads an input only through `open_output(path, expect)`, which (1) checks meta.json is there
and whole, (2) checks every listed file against its sha256 — a flipped byte, a truncated or swapped
file is one ArtifactError naming it, never a silently different score — and (3) compares the input's
lineage with `expect`, the reading stage's own tracked params: an input computed with `training.t =
1000` is refused by a stage that was asked for 500, with one line naming the key and both values.
DVC reruns whatever an edited param affects, so in a `dvc repro` these always agree; they disagree
when a stage is run by hand after a param changed, or when the params changed while an upstream
stage ran — then computing on would give results that disagree with the params recorded for them.

Only what determines the content goes into meta.json: no code version, time or process count, so the
same params and inputs give byte-identical outputs across commits (the code version is recorded
outside the outputs, by the pipeline).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sui_core.errors import ArtifactError
from sui_core.io import file_sha256, read_json, write_json

META_NAME = "meta.json"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'training': {'t': 5}} -> {'training.t': 5}; lists and scalars stay values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def canonical(value: Any) -> Any:
    """A value as it reads back from meta.json (tuples become lists, numpy scalars numbers), so that a
    recorded value and a freshly validated one compare equal exactly when they are the same param."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _same(a: Any, b: Any) -> bool:
    a, b = canonical(a), canonical(b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@dataclass(frozen=True)
class Output:
    """A stage output folder whose meta.json and file hashes have been checked."""

    path: Path
    meta: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.meta["stage"]

    @property
    def lineage(self) -> dict[str, Any]:
        return self.meta["lineage"]

    def digest(self, *names: str) -> str:
        """One sha256 over the recorded sha256 of the files `names`: what a later output was made from."""
        h = hashlib.sha256()
        for name in names:
            self.file(name)  # ArtifactError for a file the output does not hold
            h.update(self.meta["files"][name].encode())
        return h.hexdigest()

    def file(self, name: str) -> Path:
        """The path of a file this output lists (ArtifactError if it holds no such file)."""
        if name not in self.meta["files"]:
            raise ArtifactError(f"{self.path}: holds no file {name!r} (run the {self.stage} stage again)")
        return self.path / name


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` except meta.json, by relative POSIX path, sorted."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != META_NAME)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def merged_lineage(params: Mapping[str, Any], inputs: Sequence[Output]) -> dict[str, Any]:
    """The inputs' lineages (the first input that records a key wins) under this stage's own params."""
    lineage: dict[str, Any] = {}
    for source in reversed(inputs):
        lineage.update(source.lineage)
    lineage.update(canonical(flatten(params)))
    return dict(sorted(lineage.items()))


def publish(
    folder: str | Path, stage: str, params: Mapping[str, Any], inputs: Iterable[Output] = (), **extra: Any
) -> dict[str, Any]:
    """Write `folder/meta.json` for the files already in `folder` (call it last, inside `atomic_dir`).

    `params`: the params the content depends on, {section: {key: value}}; `inputs`: the checked
    outputs it was computed from (their lineage is carried on). Returns the meta.json content.
    """
    folder = Path(folder)
    inputs = list(inputs)
    meta = {
        "stage": stage,
        "params": canonical(dict(params)),
        "lineage": merged_lineage(params, inputs),
        "inputs": sorted(str(source.path) for source in inputs),
        "files": file_hashes(folder),
        **canonical(extra),
    }
    write_json(folder / META_NAME, meta)
    return meta


def open_output(path: str | Path, expect: Mapping[str, Any] | None = None, stage: str | None = None) -> Output:
    """Check an output folder (meta.json, every file's sha256, lineage vs `expect`) and return it.

    `expect`: the reading stage's own params, flattened (`{'training.lr': 0.01}`) or by section; a key
    the input's lineage records with another value is an ArtifactError naming both values. `stage`:
    the stage that must have written it (for the message when it is missing).
    """
    path = Path(path)
    meta_path = path / META_NAME
    writer = stage or "upstream"
    if not meta_path.is_file():
        raise ArtifactError(f"{meta_path}: file not found (run the {writer} stage first: dvc repro)")
    meta = read_json(meta_path)
    if isinstance(meta, dict) and isinstance(meta.get("stage"), str):
        writer = stage or meta["stage"]
    if not isinstance(meta, dict) or not {"stage", "lineage", "files"} <= set(meta):
        raise ArtifactError(
            f"{meta_path}: not a sui output record (no stage/lineage/files); rerun the {writer} "
            f"stage (dvc repro -f -s {writer})"
        )
    for name, sha in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{file}: file listed in {meta_path} is missing (rerun the {writer} stage)")
        if file_sha256(file) != sha:
            raise ArtifactError(
                f"{file}: sha256 does not match {meta_path} (file changed or corrupted); rerun the "
                f"{writer} stage (dvc repro -f -s {writer})"
            )
    output = Output(path, meta)
    check_lineage(output, expect or {})
    return output


def check_lineage(output: Output, expect: Mapping[str, Any]) -> None:
    """ArtifactError for the first param `output` was computed with another value of than `expect` says."""
    for key, want in flatten(expect).items():
        if key in output.lineage and not _same(output.lineage[key], want):
            raise ArtifactError(
                f"{output.path}: computed with {key} = {output.lineage[key]!r}, but this stage runs with {key} = "
                f"{canonical(want)!r}; rerun the stages before it (dvc repro), do not mix outputs of different params"
            )


def check_aligned(ids: np.ndarray, expected: np.ndarray, what: str | Path, against: str | Path) -> None:
    """ArtifactError unless `what` holds the samples `expected` of `against`, in that order: results of
    other samples (another split, seed or source) must never be combined row by row."""
    if not np.array_equal(ids, expected):
        raise ArtifactError(f"{what}: samples do not match {against}")
