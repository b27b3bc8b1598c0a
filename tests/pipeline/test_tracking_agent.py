"""The tracking agent (stages/tracking_agent.py): a stage logs through it without importing MLflow, and
MLflow then holds what the in-process path logs; a killed agent is replaced; one that cannot start
leaves the stage on the in-process path with one warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from stages import tracking, tracking_agent

ROOT = Path(__file__).resolve().parents[2]

# a stage's use of tracking, standalone; prints whether this process imported MLflow
STAGE = textwrap.dedent(
    """
    import sys
    from stages import tracking
    with tracking.stage_run("loo", {"loo": {"tol": 1e-9, "groups": ["label"]}}, {"loo": {"tol": 1e-9}},
                            session=sys.argv[1]) as run:
        run.log_metrics({"seconds": 1.5, "fsi": {"mean": 2.0, "nan": float("nan")}}, step=3)
        run.set_tags({"note": "x" * 10})
        run.log_artifact(sys.argv[2])
    print("mlflow" in sys.modules)
    """
)


def _stage(uri: str, session: str, artifact: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("SUI_TRACKING", "SUI_SESSION_KEY", "DVC_EXP_NAME")}
    return subprocess.run(
        [sys.executable, "-c", STAGE, session, str(artifact)],
        cwd=ROOT,
        env={**environ, "MLFLOW_TRACKING_URI": uri, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _logged(uri: str, session: str) -> dict[str, tuple]:
    """What MLflow holds of a session, by run name: status, params, metrics (with history), tags but the
    process-bound ones (owner, parent id), artifact names."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    logged = {}
    for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.SESSION_TAG}` = '{session}'"):
        tags = {k: v for k, v in run.data.tags.items() if k not in (tracking.OWNER_TAG, tracking.PARENT_TAG)}
        run_id = run.info.run_id
        history = {k: [(m.value, m.step) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        logged[run.info.run_name] = (run.info.status, run.data.params, repr(history), tags, artifacts)
    return logged


def test_agent_logs_what_one_process_logs_without_importing_mlflow(tmp_path):
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    agent, local = f"sqlite:///{tmp_path / 'agent.db'}", f"sqlite:///{tmp_path / 'local.db'}"
    via_agent = _stage(agent, "s1", artifact)
    in_process = _stage(local, "s1", artifact, SUI_TRACKING_AGENT="off")
    assert via_agent.returncode == 0, via_agent.stderr
    assert in_process.returncode == 0, in_process.stderr
    assert via_agent.stdout.split() == ["False"]  # MLflow was imported by the agent only
    assert in_process.stdout.split() == ["True"]
    logged = _logged(agent, "s1")
    assert len(logged) == 2  # the child and its parent
    assert logged == _logged(local, "s1")
    assert logged["loo"][0] == "FINISHED" and logged["loo"][4] == ["a.txt"]


def _agent_pid() -> int:
    _, lock, _ = tracking_agent._paths(tracking_agent.agent_key())
    return int(lock.read_text().split()[0])


def test_killed_agent_is_replaced(tmp_path):
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _stage(uri, "one", artifact).returncode == 0
    killed = _agent_pid()
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while tracking.owner_alive(tracking.owner_tag((killed, _create_time(killed)))) and time.monotonic() < deadline:
        time.sleep(0.1)
    sock, _, _ = tracking_agent._paths(tracking_agent.agent_key())
    assert sock.exists()  # left behind by the killed agent: the next one must replace it
    again = _stage(uri, "two", artifact)
    assert again.returncode == 0, again.stderr
    assert _agent_pid() != killed
    assert _logged(uri, "two")["loo"][0] == "FINISHED"


def _create_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0


def test_agent_that_cannot_start_falls_back_with_a_warning(tmp_path, monkeypatch, capsys):
    key = f"test-{uuid.uuid4().hex[:12]}"  # no agent serves it

    def failing_start(key: str) -> subprocess.Popen:
        _, _, log = tracking_agent._paths(key)
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('cannot import: boom')"], stderr=out)

    monkeypatch.setattr(tracking_agent, "agent_key", lambda: key)
    monkeypatch.setattr(tracking_agent, "_start_agent", failing_start)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.stage_run("prepare", {"data": {"n": 3}}, session="fallback") as run:
        run.log_metrics({"n": 3})
    err = capsys.readouterr().err
    assert "warning: tracking agent not available" in err and "boom" in err and err.count("\n") == 1
    assert _logged(uri, "fallback")["prepare"][0] == "FINISHED"
