"""MLflow tracking: one parent run per `dvc repro` / `dvc exp run`, one child run per stage that ran.

DVC starts every stage as its own process, so the stages of one pipeline run find their common parent
run through a *session key*: the pid and start time of the nearest ancestor process that is
`dvc repro` / `dvc exp ...` (for `dvc exp run --queue`, each `dvc exp exec-run` is its own session).
A stage started by hand, outside DVC, is its own session. The parent is looked up by the tag
`sui.session` in the MLflow experiment `sui` and created when absent; it carries every params.yaml
param (flattened `section.key`), the git commit and the DVC experiment name (env `DVC_EXP_NAME`, which
DVC sets for the stage commands of `dvc exp run`). After each child ends the parent is marked ended
(FINISHED, or FAILED/KILLED with the child) with the current end time; later stages of the same
session add more children and move the end time on.

Tracking URI: env `MLFLOW_TRACKING_URI` if set, else `sqlite:///<repo root>/mlflow.db`, where the repo
root is env `DVC_ROOT` (set by DVC for every stage command; for `dvc exp run --temp` it names the
user's repo, not the temporary copy), else the nearest folder holding dvc.yaml from the working
directory upward, else the working directory. Artifacts of a sqlite store go to `<repo root>/mlruns`.

Env overrides: `SUI_SESSION_KEY` forces the session key; `SUI_TRACKING=off` disables tracking (the
stage run object then logs nothing).

mlflow is imported only inside functions, so importing sui_core stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sui_core.errors import ArtifactError

EXPERIMENT_NAME = "sui"
SESSION_TAG = "sui.session"
STAGE_TAG = "sui.stage"
PARENT_TAG = "mlflow.parentRunId"
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` (dvc.env.DVC_EXP_NAME) for every stage command
DVC_EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"  # set beside DVC_EXP_NAME: the commit the experiment starts from
DVC_ROOT_ENV = "DVC_ROOT"  # set by DVC for every stage command: the repo root
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC for every stage command: the stage's address
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
MAX_TAG_LEN = 5000
_BATCH = 100  # MLflow's limit on params per log_batch call


# --------------------------------------------------------------------------------------------------
# where and which session


def repo_root(start: str | Path | None = None) -> Path:
    """The pipeline's root: env DVC_ROOT, else the nearest folder with dvc.yaml upward, else cwd."""
    env_root = os.environ.get(DVC_ROOT_ENV)
    if env_root and Path(env_root).is_dir() and start is None:
        return Path(env_root).resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def tracking_uri() -> str:
    """env MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:":
            return Path(path if path.startswith("/") else os.path.abspath(path))
    return None


def default_artifact_location(uri: str | None = None) -> str | None:
    """For a sqlite store: file URI of `mlruns/` beside the database; else None (the server decides)."""
    db = _sqlite_path(uri or tracking_uri())
    return (db.parent / "mlruns").as_uri() if db else None


def _is_dvc_pipeline_cmd(cmdline: list[str]) -> bool:
    """True for `dvc repro ...`, `dvc exp run ...`, `dvc exp exec-run ...`, `python -m dvc repro ...`."""
    for i, tok in enumerate(cmdline):
        if os.path.basename(tok) in ("dvc", "dvc.exe"):
            return any(t in ("repro", "exp") for t in cmdline[i + 1:])
    return False


def _process_key(pid: int, create_time: float) -> str:
    return f"{pid}-{create_time:.3f}"


def dvc_ancestor() -> tuple[int, float] | None:
    """(pid, create_time) of the nearest ancestor process that runs `dvc repro` / `dvc exp`, if any."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            try:
                if _is_dvc_pipeline_cmd(proc.cmdline()):
                    return proc.pid, proc.create_time()
                proc = proc.parent()
            except (psutil.AccessDenied, psutil.ZombieProcess):
                proc = proc.parent()
    except psutil.Error:
        return None
    return None


def session_key() -> str:
    """f"{pid}-{create_time}" of the dvc ancestor; without one, of this process (a standalone run)."""
    override = os.environ.get("SUI_SESSION_KEY", "").strip()
    if override:
        return override
    found = dvc_ancestor()
    if found:
        return _process_key(*found)
    import psutil

    return _process_key(os.getpid(), psutil.Process().create_time())


def session_kind() -> str:
    if os.environ.get("SUI_SESSION_KEY", "").strip():
        return "given"
    if dvc_ancestor() is None:
        return "standalone"
    return "dvc-exp" if os.environ.get(DVC_EXP_NAME_ENV) else "dvc-repro"


# --------------------------------------------------------------------------------------------------
# helpers


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': 2} -> {'a.b': 1, 'c': 2}; lists and scalars stay values."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _param_str(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:MAX_PARAM_LEN]


def _metric_value(key: str, value: Any) -> float:
    try:
        import numpy as np

        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: not a number ({type(value).__name__}: {value!r:.80})") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


@functools.lru_cache(maxsize=1)
def _code() -> dict[str, Any]:
    from sui_core.io import code_version

    return code_version()


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import mlflow  # noqa: F401  (configures its loggers on import; lower them afterwards)

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"mlflow(\..*)?")
    warnings.filterwarnings("ignore", module=r"(pydantic|alembic|sqlalchemy)(\..*)?")


def _client():
    _quiet_mlflow()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def _experiment_id(client) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(EXPERIMENT_NAME)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT_NAME, artifact_location=default_artifact_location())
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(EXPERIMENT_NAME)
        if exp is None:
            raise
        return exp.experiment_id


def _log_params(client, run_id: str, params: Mapping[str, Any], skip: Mapping[str, str] | None = None) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_str(v)) for k, v in flatten(params).items() if not skip or k not in skip]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[start:start + _BATCH])


def _find_or_create_parent(client, experiment_id: str, key: str, stage: str,
                           all_params: Mapping[str, Any] | None) -> str:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SESSION_TAG}` = '{key}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    if runs:
        parent = runs[0]
        client.update_run(parent.info.run_id, status="RUNNING")
        if all_params:  # a parent made by a stage that had no params.yaml: fill in what is missing
            _log_params(client, parent.info.run_id, all_params, skip=parent.data.params)
        return parent.info.run_id

    code = _code()
    commit = code.get("git_commit")
    exp_name = os.environ.get(DVC_EXP_NAME_ENV, "").strip()
    kind = session_kind()
    short = commit[:7] if commit else "nogit"
    run_name = exp_name or (f"repro {short}" if kind == "dvc-repro" else f"{stage} {short}")
    tags = {
        SESSION_TAG: key,
        "sui.kind": kind,
        "sui.version": code.get("sui_version"),
        "sui.repo_root": str(repo_root()),
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["sui.git_commit"] = commit
        tags["sui.git_dirty"] = str(code.get("git_dirty"))
    if exp_name:
        tags["sui.dvc_exp_name"] = exp_name
    if os.environ.get(DVC_EXP_BASELINE_ENV):
        tags["sui.dvc_exp_baseline_rev"] = os.environ[DVC_EXP_BASELINE_ENV]
    run = client.create_run(experiment_id, tags={k: v for k, v in tags.items() if v is not None},
                            run_name=run_name)
    if all_params:
        _log_params(client, run.info.run_id, all_params)
    return run.info.run_id


# --------------------------------------------------------------------------------------------------
# the run object handed to a stage


class StageRun:
    """The child run of one stage: log metrics, artifacts and tags to it."""

    def __init__(self, client, run_id: str, parent_run_id: str, experiment_id: str, stage: str):
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.stage = stage

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers; nested dicts are flattened to `a.b`. Non-finite values are logged as they are."""
        from mlflow.entities import Metric

        ts = _now_ms()
        items = [Metric(k, _metric_value(k, v), ts, step or 0) for k, v in flatten(metrics).items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: cannot log artifact, file not found")
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"{directory}: cannot log artifacts, folder not found")
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)


class NullStageRun:
    """Stand-in when tracking is off (SUI_TRACKING=off): accepts everything, logs nothing."""

    run_id = parent_run_id = experiment_id = None

    def __init__(self, stage: str):
        self.stage = stage

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for k, v in flatten(metrics).items():
            _metric_value(k, v)  # same type check as the real run

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).is_file():
            raise ArtifactError(f"{path}: cannot log artifact, file not found")

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if not Path(directory).is_dir():
            raise ArtifactError(f"{directory}: cannot log artifacts, folder not found")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass


def tracking_enabled() -> bool:
    return os.environ.get("SUI_TRACKING", "on").strip().lower() not in ("off", "0", "false", "no")


def _end_status(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "FINISHED"
    return "FAILED"


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], all_params: Mapping[str, Any] | None = None,
              session: str | None = None) -> Iterator[StageRun | NullStageRun]:
    """Open the child run of `stage` under this session's parent run; yield it; close both.

    `params`: the stage's own params, {section: {key: value}} (logged flattened as `section.key`).
    `all_params`: the whole params.yaml, logged on the parent when it is created. `session`: the
    session key (default `session_key()`). An exception inside marks the child FAILED (KILLED for
    KeyboardInterrupt), tags it `sui.error`, and propagates.
    """
    if not tracking_enabled():
        yield NullStageRun(stage)
        return

    client = _client()
    experiment_id = _experiment_id(client)
    key = session or session_key()
    parent_id = _find_or_create_parent(client, experiment_id, key, stage, all_params)
    code = _code()
    tags = {
        STAGE_TAG: stage,
        PARENT_TAG: parent_id,
        SESSION_TAG: key,
        "sui.version": code.get("sui_version"),
    }
    if code.get("git_commit"):
        tags["mlflow.source.git.commit"] = code["git_commit"]
        tags["sui.git_dirty"] = str(code.get("git_dirty"))
    if os.environ.get(DVC_EXP_NAME_ENV):
        tags["sui.dvc_exp_name"] = os.environ[DVC_EXP_NAME_ENV]
    if os.environ.get(DVC_STAGE_ENV):
        tags["sui.dvc_stage"] = os.environ[DVC_STAGE_ENV]
    child = client.create_run(experiment_id, tags={k: v for k, v in tags.items() if v is not None},
                              run_name=stage)
    run = StageRun(client, child.info.run_id, parent_id, experiment_id, stage)
    status = "FINISHED"
    try:
        _log_params(client, run.run_id, params)
        yield run
    except BaseException as exc:
        status = _end_status(exc)
        if status != "FINISHED":
            with contextlib.suppress(Exception):
                message = " ".join(str(exc).split()) or type(exc).__name__
                run.set_tags({"sui.error": f"{type(exc).__name__}: {message}"})
        raise
    finally:
        end = _now_ms()
        with contextlib.suppress(Exception) if status != "FINISHED" else contextlib.nullcontext():
            client.set_terminated(run.run_id, status=status, end_time=end)
            client.set_terminated(parent_id, status=status, end_time=end)
