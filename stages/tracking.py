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

Every metric a child logs is also logged on the parent, prefixed by the stage (`evaluate.fsi_auroc`,
`loo.seconds`), so that comparing parent runs in the MLflow UI compares results.

Stages DVC does not run (restored from its run cache, or unchanged) log nothing themselves. The last
DVC stage, `track` (stages/track.py, `always_changed`, so never restored itself), calls
`log_restored`: for every pipeline stage without a child run in this session it logs that stage's
metrics, read from its outputs, on the parent (prefixed the same way) and tags the parent
`sui.restored` with the comma list of those stages: their numbers were not recomputed in this session.
It creates the parent when no stage ran only for `dvc exp run` (env DVC_EXP_NAME set), so that every
experiment appears in MLflow, even one restored entirely from the run cache; a plain `dvc repro` that
ran nothing logs nothing (it changed nothing).

Tracking URI: env `MLFLOW_TRACKING_URI` if set, else `sqlite:///<repo root>/mlflow.db`, where the repo
root is env `DVC_ROOT` (set by DVC for every stage command; for `dvc exp run --temp` it names the
user's repo, not the temporary copy), else the nearest folder holding dvc.yaml from the working
directory upward, else the working directory. Artifacts of a sqlite store go to `<repo root>/mlruns`.

Env overrides: `SUI_SESSION_KEY` forces the session key; `SUI_TRACKING=off` disables tracking (the
stage run object then logs nothing).

Tracking faults stop the stage, they never hang it: the stage fails with one line `error: ...` naming
the tracking store (the sqlite file, or the server URI) and the way out (`SUI_TRACKING=off`), exit 1.
Running on untracked would leave a DVC output with no MLflow run behind it, unnoticed; so the stage
refuses. For an http(s) URI the server is probed once (GET `<uri>/health`, PROBE_TIMEOUT_S) before
the stage's work starts: a refused connection or a server that does not answer fails in seconds instead
of MLflow's retries (about 4 minutes). MLflow's own requests for the rest of the run are bounded too
(env MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES / _BACKOFF_FACTOR, defaults in MLFLOW_HTTP_BOUNDS, a
user's own values win), so a server that dies mid-run fails within seconds. Every MLflow call (opening
the store, creating, logging to and ending runs) goes through `_GuardedClient`, which turns MLflow,
sqlalchemy and OS errors (a read-only or deleted mlflow.db, a full disk) into that one-line
`TrackingError`; a KeyboardInterrupt passes through unchanged.

Runs of killed stages: each run is tagged `sui.owner` = `<host>/<pid>-<start time>` of the process that
owns it (a child run: its stage process; a parent run: its session process, see `session_owner()`).
A SIGKILLed stage cannot close its runs, so every stage start looks for RUNNING runs of the experiment
(one search) and marks KILLED those whose owner process is gone (and, for a parent, that have no live
child); runs owned by a live process (a concurrent stage) or by another host are left alone.

The experiment is created with the tag `mlflow.experimentKind` = `custom_model_development`; an
existing `sui` experiment without the tag gets it. MLflow 3.17's UI still picks its view from its own
GenAI / model-training switch (stored in the browser, GenAI by default) unless the URL says
`workflowType=machine_learning`: `sui ui` therefore prints the URL of the runs table with it
(`runs_page`), which opens on the training runs in any browser.

Where the MLflow calls run: `STORE_CALLS` names every one (plain data in and out, the session's facts
computed in the stage by `session_facts`). By default the tracking agent runs them (stages/tracking_agent.py:
one long-lived process that keeps MLflow imported, so a stage does not pay MLflow's 3–4 s import and store
opening); with SUI_TRACKING_AGENT=off, or a URI the agent could read differently (not an absolute sqlite
path nor http(s)), the stage's own process does (`LocalStore`). mlflow is imported only there.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import os
import socket
import sqlite3
import ssl
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sui_core.errors import ArtifactError, TrackingError

EXPERIMENT_NAME = "sui"
SESSION_TAG = "sui.session"
STAGE_TAG = "sui.stage"
RESTORED_TAG = "sui.restored"  # on a parent: the stages whose metrics were read from outputs, not recomputed
PARENT_TAG = "mlflow.parentRunId"
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` (dvc.env.DVC_EXP_NAME) for every stage command
DVC_EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"  # set beside DVC_EXP_NAME: the commit the experiment starts from
DVC_ROOT_ENV = "DVC_ROOT"  # set by DVC for every stage command: the repo root
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC for every stage command: the stage's address
OWNER_TAG = "sui.owner"  # <host>/<pid>-<start time> of the process that closes the run
# the tag MLflow 3's UI reads to choose an experiment's view, and its value for model training (both
# defined in mlflow/server/js/build: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT; no Python constant)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PROBE_TIMEOUT_S = 3.0
# MLflow's defaults (120 s timeout, 7 retries, backoff factor 2) wait about 4 minutes on a dead server
MLFLOW_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
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
        path = uri[len("sqlite:///") :]
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
            return any(t in ("repro", "exp") for t in cmdline[i + 1 :])
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


def _this_process() -> tuple[int, float]:
    import psutil

    return os.getpid(), psutil.Process().create_time()


def session_owner() -> tuple[int, float] | None:
    """(pid, create_time) of the process a session lives as long as: the dvc ancestor, else this one.

    None when SUI_SESSION_KEY forces the session: no process is known to own it."""
    if os.environ.get("SUI_SESSION_KEY", "").strip():
        return None
    return dvc_ancestor() or _this_process()


def session_key() -> str:
    """f"{pid}-{create_time}" of the dvc ancestor; without one, of this process (a standalone run)."""
    override = os.environ.get("SUI_SESSION_KEY", "").strip()
    return override or _process_key(*session_owner())


def owner_tag(process: tuple[int, float]) -> str:
    """`<host>/<pid>-<create_time>`: names a process uniquely, also after its pid is reused."""
    return f"{socket.gethostname()}/{_process_key(*process)}"


def owner_alive(tag: str) -> bool:
    """False only when the process an owner tag names is known to be gone (or a zombie).

    Another host's process cannot be checked: counted alive, its runs are left alone."""
    import psutil

    host, _, key = tag.rpartition("/")
    pid, _, created = key.partition("-")
    try:
        pid_number, create_time = int(pid), float(created)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    try:
        proc = psutil.Process(pid_number)
        same = abs(proc.create_time() - create_time) < 0.5  # else the pid was reused
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


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
    # these log every store/HTTP failure with its traceback; _store_errors reports it in one line
    for name in ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"mlflow(\..*)?")
    warnings.filterwarnings("ignore", module=r"(pydantic|alembic|sqlalchemy)(\..*)?")


def _store_name(uri: str) -> str:
    """What a user knows the store as: `store <sqlite file>`, else `server <URI>`."""
    db = _sqlite_path(uri)
    return f"store {db}" if db else f"server {uri}"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (MLflow wraps sqlalchemy wraps sqlite3 ...)."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)) is not None and id(
        inner
    ) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _tracking_failures() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, sqlite3.Error, OSError  # requests' errors are OSErrors


@contextlib.contextmanager
def _store_errors(uri: str, action: str) -> Iterator[None]:
    """Turn a failure of the tracking store during `action` into one TrackingError line."""
    try:
        yield
    except _tracking_failures() as exc:
        root = _root_cause(exc)
        lines = [line for line in str(root).splitlines() if line.strip()]
        cause = f"{type(root).__name__}: {lines[0].strip()[:300] if lines else 'no message'}"
        db = _sqlite_path(uri)
        if db is not None and not db.exists():
            cause += " (the file is gone)"
        raise TrackingError(
            f"MLflow tracking {_store_name(uri)}: {action} failed ({cause}); fix the store or "
            f"MLFLOW_TRACKING_URI, or run without tracking: SUI_TRACKING=off"
        ) from None


class _GuardedClient:
    """An MlflowClient whose every call fails as one TrackingError line naming the store."""

    def __init__(self, client, uri: str):
        self._client = client
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def guarded(*args, **kwargs):
            with _store_errors(self._uri, f"MLflow {name}"):
                return attr(*args, **kwargs)

        return guarded


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """For an http(s) URI: one GET <uri>/health; TrackingError when the server does not answer in time.

    Any HTTP answer (also 401 or 404) or TLS handshake (also with a certificate urllib rejects, which
    MLFLOW_TRACKING_INSECURE_TLS may allow) counts: the server is there, MLflow reports the rest."""
    if uri.split(":", 1)[0].lower() not in ("http", "https"):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except urllib.error.URLError as exc:
        if not isinstance(exc.reason, ssl.SSLError):
            raise _unreachable(uri, health, exc.reason, timeout) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # read timeout, reset, not HTTP
        raise _unreachable(uri, health, exc, timeout) from None


def _unreachable(uri: str, health: str, reason: Any, timeout: float) -> TrackingError:
    """The one line for a server that is not there: the URI, what the probe saw, the way out."""
    if isinstance(reason, TimeoutError):
        reason = f"no answer within {timeout:g} s"
    return TrackingError(
        f"MLflow tracking server {uri} does not answer (GET {health}: {reason}); start it, "
        f"fix MLFLOW_TRACKING_URI, or run without tracking: SUI_TRACKING=off"
    )


def _client(uri: str | None = None) -> _GuardedClient:
    """An MlflowClient of `uri` (default `tracking_uri()`) in this process: imports MLflow (seconds)."""
    for name, value in MLFLOW_HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    _quiet_mlflow()
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    with _store_errors(uri, "opening the store"):
        client = MlflowClient(tracking_uri=uri)
    return _GuardedClient(client, uri)


def _experiment_id(client, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(EXPERIMENT_NAME)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(
            EXPERIMENT_NAME, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(EXPERIMENT_NAME)
        if exp is None:
            raise
        return exp.experiment_id


def runs_page() -> str:
    """The UI route of the sui experiment's runs table in the model-training view (made if missing)."""
    experiment_id = _store(tracking_uri()).call("experiment_id", artifact_location=default_artifact_location())
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _log_params(client, run_id: str, params: Mapping[str, Any], skip: Mapping[str, str] | None = None) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_str(v)) for k, v in flatten(params).items() if not skip or k not in skip]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[start : start + _BATCH])


def _find_or_create_parent(
    client, experiment_id: str, facts: Mapping[str, Any], stage: str, all_params: Mapping[str, Any] | None
) -> str:
    key = facts["key"]
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SESSION_TAG}` = '{key}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        parent = runs[0]
        client.update_run(parent.info.run_id, status="RUNNING")
        if all_params:  # a parent made by a stage that had no params.yaml: fill in what is missing
            _log_params(client, parent.info.run_id, all_params, skip=parent.data.params)
        return parent.info.run_id

    code, env = facts["code"], facts["env"]
    commit = code.get("git_commit")
    exp_name = (env.get(DVC_EXP_NAME_ENV) or "").strip()
    kind = facts["kind"]
    short = commit[:7] if commit else "nogit"
    run_name = exp_name or (f"repro {short}" if kind == "dvc-repro" else f"{stage} {short}")
    tags = {
        SESSION_TAG: key,
        OWNER_TAG: facts["session_owner"],
        "sui.kind": kind,
        "sui.version": code.get("sui_version"),
        "sui.repo_root": facts["repo_root"],
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["sui.git_commit"] = commit
        tags["sui.git_dirty"] = str(code.get("git_dirty"))
    if exp_name:
        tags["sui.dvc_exp_name"] = exp_name
    if env.get(DVC_EXP_BASELINE_ENV):
        tags["sui.dvc_exp_baseline_rev"] = env[DVC_EXP_BASELINE_ENV]
    run = client.create_run(experiment_id, tags={k: v for k, v in tags.items() if v is not None}, run_name=run_name)
    if all_params:
        _log_params(client, run.info.run_id, all_params)
    return run.info.run_id


def stage_prefixed(stage: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's metrics as the parent run holds them: `evaluate.fsi_auroc`, `loo.seconds`, ..."""
    return {f"{stage}.{key}": value for key, value in flatten(metrics).items()}


def _log_metric_values(client, run_id: str, values: Mapping[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = _now_ms()
    items = [Metric(k, v, ts, step or 0) for k, v in values.items()]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start : start + 1000])


def log_restored(
    stages: Sequence[str], metrics_of: Callable[[str], Mapping[str, Any]], all_params: Mapping[str, Any] | None = None
) -> list[str] | None:
    """Log the metrics of the `stages` that have no child run in this session on its parent (see the
    module docstring); `metrics_of(stage)` reads them from the stage's outputs. Returns those stages,
    or None when nothing was logged (tracking off, or a plain `dvc repro` in which no stage ran)."""
    if not tracking_enabled():
        return None
    uri = tracking_uri()
    probe_server(uri)
    store, facts = _store(uri), session_facts(None)
    session = store.call("session_runs", facts=facts)
    if not session["parents"] and not (facts["env"].get(DVC_EXP_NAME_ENV) or "").strip():
        return None
    restored = [stage for stage in stages if stage not in session["ran"]]
    values = {}
    for stage in restored:
        values |= stage_prefixed(stage, {k: _metric_value(k, v) for k, v in flatten(metrics_of(stage)).items()})
    store.call("log_restored", facts=facts, values=values, restored=restored, all_params=all_params)
    return restored


def _session_runs(client, facts: Mapping[str, Any]) -> dict[str, list[str]]:
    """The parent runs of this session and the stages that have a child run in it."""
    experiment_id = _experiment_id(client, facts["artifact_location"])
    session = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SESSION_TAG}` = '{facts['key']}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    return {
        "parents": [r.info.run_id for r in session if PARENT_TAG not in r.data.tags],
        "ran": sorted({r.data.tags.get(STAGE_TAG) for r in session if PARENT_TAG in r.data.tags} - {None}),
    }


def _log_restored(
    client,
    facts: Mapping[str, Any],
    values: Mapping[str, float],
    restored: Sequence[str],
    all_params: Mapping[str, Any] | None,
) -> None:
    """Log `values` on the session's parent (made, and closed again, for a `dvc exp run` that ran no stage)."""
    parents = _session_runs(client, facts)["parents"]
    experiment_id = _experiment_id(client, facts["artifact_location"])
    parent_id = parents[0] if parents else _find_or_create_parent(client, experiment_id, facts, "track", all_params)
    _log_metric_values(client, parent_id, values)
    if restored:
        client.set_tag(parent_id, RESTORED_TAG, ",".join(restored)[:MAX_TAG_LEN])
    if not parents:
        client.set_terminated(parent_id, status="FINISHED")


def close_orphaned_runs(client, experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose owner process is gone (a SIGKILLed stage); return their ids.

    A parent is closed only when its session process is gone and none of its children is still
    owned by a live process. The status is read again after the owner is found gone: a run its owner
    closed meanwhile is not touched."""
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    alive = {tag: owner_alive(tag) for tag in {r.data.tags.get(OWNER_TAG) for r in running} if tag}
    live_parents = {
        r.data.tags[PARENT_TAG]
        for r in running
        if PARENT_TAG in r.data.tags and alive.get(r.data.tags.get(OWNER_TAG), True)
    }
    closed = []
    for run in running:
        owner = run.data.tags.get(OWNER_TAG)
        if not owner or alive[owner] or run.info.run_id in live_parents:
            continue
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue
        client.set_tag(
            run.info.run_id,
            "sui.error",
            f"killed: its process {owner} ended without closing the run (closed when stage {stage} started)",
        )
        client.set_terminated(run.info.run_id, status="KILLED", end_time=_now_ms())
        closed.append(run.info.run_id)
    return closed


# --------------------------------------------------------------------------------------------------
# the store: the MLflow calls, made in this process or in the tracking agent


def session_facts(session: str | None) -> dict[str, Any]:
    """What the store calls need to know about this process and its session (its environment, process
    tree and git commit), as plain data: the calls may run in the tracking agent, another process."""
    owner = session_owner() if session is None else None
    return {
        "key": session or session_key(),
        "session_owner": owner_tag(owner) if owner else None,
        "kind": session_kind(),
        "owner": owner_tag(_this_process()),
        "code": _code(),
        "repo_root": str(repo_root()),
        "artifact_location": default_artifact_location(),
        "env": {name: os.environ.get(name) for name in (DVC_EXP_NAME_ENV, DVC_EXP_BASELINE_ENV, DVC_STAGE_ENV)},
    }


def _open_stage(client, facts: Mapping[str, Any], stage: str, all_params: Mapping[str, Any] | None) -> dict[str, str]:
    """Close runs of killed stages, find or make the session's parent run, make the stage's child run."""
    experiment_id = _experiment_id(client, facts["artifact_location"])
    close_orphaned_runs(client, experiment_id, stage)
    parent_id = _find_or_create_parent(client, experiment_id, facts, stage, all_params)
    code, env = facts["code"], facts["env"]
    tags = {
        STAGE_TAG: stage,
        PARENT_TAG: parent_id,
        SESSION_TAG: facts["key"],
        OWNER_TAG: facts["owner"],
        "sui.version": code.get("sui_version"),
    }
    if code.get("git_commit"):
        tags["mlflow.source.git.commit"] = code["git_commit"]
        tags["sui.git_dirty"] = str(code.get("git_dirty"))
    if env.get(DVC_EXP_NAME_ENV):
        tags["sui.dvc_exp_name"] = env[DVC_EXP_NAME_ENV]
    if env.get(DVC_STAGE_ENV):
        tags["sui.dvc_stage"] = env[DVC_STAGE_ENV]
    child = client.create_run(experiment_id, tags={k: v for k, v in tags.items() if v is not None}, run_name=stage)
    return {"run_id": child.info.run_id, "parent_id": parent_id, "experiment_id": experiment_id}


def _log_metrics(
    client, run_id: str, parent_id: str, stage: str, values: Mapping[str, float], step: int | None
) -> None:
    _log_metric_values(client, run_id, values, step)
    _log_metric_values(client, parent_id, stage_prefixed(stage, values), step)


def _set_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _end_runs(client, run_ids: Sequence[str], status: str, end_time: int) -> None:
    for run_id in run_ids:
        client.set_terminated(run_id, status=status, end_time=end_time)


# name -> function(client, **plain data): every MLflow call a stage makes; the tracking agent runs only these
STORE_CALLS: dict[str, Callable[..., Any]] = {
    "experiment_id": _experiment_id,
    "open_stage": _open_stage,
    "log_params": lambda client, run_id, params: _log_params(client, run_id, params),
    "log_metrics": _log_metrics,
    "log_artifact": lambda client, run_id, path, artifact_path: client.log_artifact(run_id, path, artifact_path),
    "log_artifacts": lambda client, run_id, path, artifact_path: client.log_artifacts(run_id, path, artifact_path),
    "set_tags": _set_tags,
    "end_runs": _end_runs,
    "session_runs": _session_runs,
    "log_restored": _log_restored,
}


class LocalStore:
    """The store calls in this process, on one MlflowClient opened on first use (MLflow's import: seconds)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._opened: _GuardedClient | None = None

    def call(self, name: str, **kwargs: Any) -> Any:
        if self._opened is None:
            self._opened = _client(self.uri)
        return STORE_CALLS[name](self._opened, **kwargs)


def _store(uri: str):
    """Where the store calls run: the tracking agent (stages/tracking_agent.py), or this process with
    SUI_TRACKING_AGENT=off (or when the agent cannot start)."""
    off = os.environ.get("SUI_TRACKING_AGENT", "on").strip().lower() in ("off", "0", "false", "no")
    db = _sqlite_path(uri)
    # the agent runs elsewhere: only URIs that name the same store from any folder go there
    remote = uri.split(":", 1)[0].lower() in ("http", "https")
    if off or not (remote or (db is not None and uri.startswith("sqlite:////"))):
        return LocalStore(uri)
    from stages.tracking_agent import AgentStore

    return AgentStore(uri)


# --------------------------------------------------------------------------------------------------
# the run object handed to a stage


class StageRun:
    """The child run of one stage: log metrics, artifacts and tags to it."""

    def __init__(self, store, run_id: str, parent_run_id: str, experiment_id: str, stage: str):
        self.store = store
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.stage = stage

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers to the child and, prefixed `<stage>.`, to the parent (comparing parents in the
        MLflow UI then compares results). Nested dicts are flattened to `a.b`; non-finite values are
        logged as they are."""
        values = {k: _metric_value(k, v) for k, v in flatten(metrics).items()}
        self.store.call(
            "log_metrics", run_id=self.run_id, parent_id=self.parent_run_id, stage=self.stage, values=values, step=step
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: cannot log artifact, file not found")
        self.store.call("log_artifact", run_id=self.run_id, path=str(path.resolve()), artifact_path=artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"{directory}: cannot log artifacts, folder not found")
        self.store.call("log_artifacts", run_id=self.run_id, path=str(directory.resolve()), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self.store.call("set_tags", run_id=self.run_id, tags={k: str(v)[:MAX_TAG_LEN] for k, v in tags.items()})


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
def stage_run(
    stage: str, params: Mapping[str, Any], all_params: Mapping[str, Any] | None = None, session: str | None = None
) -> Iterator[StageRun | NullStageRun]:
    """Open the child run of `stage` under this session's parent run; yield it; close both.

    `params`: the stage's own params, {section: {key: value}} (logged flattened as `section.key`).
    `all_params`: the whole params.yaml, logged on the parent when it is created. `session`: the
    session key (default `session_key()`). An exception inside marks the child FAILED (KILLED for
    KeyboardInterrupt), tags it `sui.error`, and propagates.
    """
    if not tracking_enabled():
        yield NullStageRun(stage)
        return

    uri = tracking_uri()
    probe_server(uri)
    store = _store(uri)
    opened = store.call("open_stage", facts=session_facts(session), stage=stage, all_params=all_params)
    run = StageRun(store, opened["run_id"], opened["parent_id"], opened["experiment_id"], stage)
    status = "FINISHED"
    try:
        store.call("log_params", run_id=run.run_id, params=params)
        yield run
    except BaseException as exc:
        status = _end_status(exc)
        if status != "FINISHED":
            with contextlib.suppress(Exception):
                message = " ".join(str(exc).split()) or type(exc).__name__
                run.set_tags({"sui.error": f"{type(exc).__name__}: {message}"})
        raise
    finally:
        with contextlib.suppress(Exception) if status != "FINISHED" else contextlib.nullcontext():
            store.call("end_runs", run_ids=[run.run_id, run.parent_run_id], status=status, end_time=_now_ms())
