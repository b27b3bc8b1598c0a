"""Tracking faults end a stage in seconds with one `error:` line; runs of killed stages get closed.

Each fault is produced for real: a refused port, a socket that accepts and never answers, a server
that answers the probe and dies, an immutable (`chattr +i`) or deleted mlflow.db, a SIGKILLed stage.
Stages run as DVC runs them, in a subprocess (`run_stage` with a trivial body).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stages import tracking

ROOT = Path(__file__).resolve().parents[2]
WALL_LIMIT_S = 10.0

STAGE_SCRIPT = '''\
"""A trivial stage: env BODY picks what its body does (delete the db, sleep), env MARKER is touched."""
import os
import time
from pathlib import Path

from stages.common import run_stage


def body(cfg, run):
    Path(os.environ.get("MARKER", "body_ran")).write_text(run.run_id or "untracked")
    action = os.environ.get("BODY", "")
    if action.startswith("delete-db"):
        os.remove(os.environ["DB"])
    if action == "sleep":
        time.sleep(120)
    return {} if action == "delete-db-quiet" else {"x": 1.0}


run_stage("probe", [], body, "params.yaml")
'''


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "stage_probe.py").write_text(STAGE_SCRIPT)
    return tmp_path


def _env(uri: str, **extra: str) -> dict[str, str]:
    """The test's environment without tracking/DVC overrides or proxies (the servers are on loopback)."""
    drop = ("SUI_SESSION_KEY", "SUI_TRACKING", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and "proxy" not in k.lower() and not k.startswith("MLFLOW_HTTP_REQUEST")
    }
    return {**env, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, **extra}


def _run_stage(project: Path, uri: str, timeout: float = 60, **extra: str):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "stage_probe.py"],
        cwd=project,
        env=_env(uri, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - started


def _assert_one_error_line(proc, *names: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for name in (*names, "SUI_TRACKING=off"):
        assert name in lines[0]
    return lines[0]


def _free_port() -> int:
    """A loopback port nobody listens on: bound by us, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- item 5: an http(s) tracking URI that does not answer ---------------------------------------


def test_refused_tracking_server_fails_fast(project):
    uri = f"http://127.0.0.1:{_free_port()}"
    proc, wall = _run_stage(project, uri)
    _assert_one_error_line(proc, uri)
    assert wall < WALL_LIMIT_S
    assert not (project / "body_ran").exists()  # refused before the stage's work starts


def test_silent_tracking_server_fails_fast(project):
    with socket.socket() as listener:  # accepts connections (kernel backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        proc, wall = _run_stage(project, uri)
    line = _assert_one_error_line(proc, uri)
    assert "no answer within" in line
    assert wall < WALL_LIMIT_S
    assert not (project / "body_ran").exists()


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_tracking_server_dying_after_the_probe_fails_fast(project):
    """Answers the one probe, then is gone: MLflow's own requests must give up within seconds."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthOnly)
    uri = f"http://127.0.0.1:{server.server_address[1]}"

    def serve_one_then_die():
        server.handle_request()
        server.server_close()

    thread = threading.Thread(target=serve_one_then_die, daemon=True)
    thread.start()
    try:
        proc, wall = _run_stage(project, uri)
    finally:
        thread.join(timeout=5)
        server.server_close()
    _assert_one_error_line(proc, uri)
    assert wall < WALL_LIMIT_S


# ---- item 6: mlflow.db read-only or deleted mid-run ---------------------------------------------


@pytest.fixture(scope="module")
def initialised_db(tmp_path_factory):
    """An mlflow.db with the sui experiment (creating the schema takes seconds: done once, copied)."""
    db = tmp_path_factory.mktemp("db") / "mlflow.db"
    uri = f"sqlite:///{db}"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from stages import tracking\nwith tracking.stage_run('init', {}, session='init'): pass",
        ],
        cwd=ROOT,
        env=_env(uri),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return db


@pytest.fixture()
def db_uri(project, initialised_db):
    db = project / "mlflow.db"
    shutil.copy(initialised_db, db)
    return db, f"sqlite:///{db}"


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_immutable_mlflow_db_is_one_line(db_uri):
    db, uri = db_uri
    if os.geteuid() != 0 or not _chattr("+i", db):
        pytest.skip("needs root and `chattr +i` on the temp filesystem (chmod does not stop root)")
    try:
        proc, _ = _run_stage(db.parent, uri)
    finally:
        _chattr("-i", db)
    line = _assert_one_error_line(proc, str(db))
    assert "readonly" in line


@pytest.mark.parametrize("body", ["delete-db", "delete-db-quiet"])
def test_mlflow_db_deleted_mid_run_is_one_line(db_uri, body):
    """Deleted inside the stage body: logging its metrics fails, or (no metrics) ending the run."""
    db, uri = db_uri
    proc, _ = _run_stage(db.parent, uri, BODY=body, DB=str(db))
    line = _assert_one_error_line(proc, str(db))
    assert ("log_batch" if body == "delete-db" else "set_terminated") in line
    assert "the file is gone" in line


# ---- item 8: runs of SIGKILLed stages are closed at the next stage start ------------------------


def _runs_of_standalone(client, pid: int):
    """The child and parent run of a stage started by hand: its session key is its own `pid-start`."""
    exp = client.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    return [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get(tracking.SESSION_TAG, "").startswith(f"{pid}-")
    ]


def _start_sleeping_stage(project: Path, uri: str, marker: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "stage_probe.py"],
        cwd=project,
        env=_env(uri, BODY="sleep", MARKER=str(marker)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(marker: Path, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert all(p.poll() is None for p in procs), "a sleeping stage exited early"
        assert time.monotonic() < deadline, f"{marker.name} not written within {timeout} s"
        time.sleep(0.2)


def test_killed_stage_runs_are_closed_live_ones_left(db_uri, monkeypatch):
    from mlflow import MlflowClient

    db, uri = db_uri
    project = db.parent
    killed = _start_sleeping_stage(project, uri, project / "killed_started")
    live = _start_sleeping_stage(project, uri, project / "live_started")
    try:
        _wait_for(project / "killed_started", [killed, live])
        _wait_for(project / "live_started", [killed, live])
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        client = MlflowClient(tracking_uri=uri)
        left = _runs_of_standalone(client, killed.pid)
        assert len(left) == 2 and {r.info.status for r in left} == {"RUNNING"}  # as SIGKILL left them

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with tracking.stage_run("next", {}, session="next"):
            pass

        dead_runs = _runs_of_standalone(client, killed.pid)
        assert len(dead_runs) == 2  # its child and its parent (both owned by the stage process)
        assert {r.info.status for r in dead_runs} == {"KILLED"}
        assert all("ended without closing" in r.data.tags["sui.error"] for r in dead_runs)
        live_runs = _runs_of_standalone(client, live.pid)
        assert len(live_runs) == 2 and {r.info.status for r in live_runs} == {"RUNNING"}
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_owner_alive_tells_gone_and_reused_pids():
    me = tracking._this_process()
    assert tracking.owner_alive(tracking.owner_tag(me))
    assert not tracking.owner_alive(tracking.owner_tag((me[0], me[1] - 100)))  # the pid was reused
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    assert not tracking.owner_alive(tracking.owner_tag((exited.pid, me[1])))
    assert tracking.owner_alive(f"another-host/{exited.pid}-{me[1]:.3f}")  # cannot be checked here


def test_parent_with_a_live_child_is_left_open(tmp_path, monkeypatch):
    """A parent whose session process is gone stays RUNNING while a child of it is owned by a live one."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    client = tracking._client()
    experiment_id = tracking._experiment_id(client, tracking.default_artifact_location())
    dead_owner = tracking.owner_tag((gone.pid, tracking._this_process()[1]))
    parent = client.create_run(experiment_id, tags={tracking.OWNER_TAG: dead_owner}).info.run_id
    child = client.create_run(
        experiment_id,
        tags={tracking.PARENT_TAG: parent, tracking.OWNER_TAG: tracking.owner_tag(tracking._this_process())},
    )
    assert tracking.close_orphaned_runs(client, experiment_id, "next") == []
    client.set_terminated(child.info.run_id)
    assert tracking.close_orphaned_runs(client, experiment_id, "next") == [parent]
    assert MlflowClient(tracking_uri=uri).get_run(parent).info.status == "KILLED"


# ---- item 12: the experiment opens on its runs in MLflow 3's UI ---------------------------------


def _ui_bundle() -> str:
    import mlflow

    build = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    for path in sorted(build.glob("main.*.js")):
        return path.read_text(errors="replace")
    pytest.skip(f"mlflow's UI bundle (main.*.js) is not installed under {build}")


def test_experiment_kind_is_model_training(tmp_path, monkeypatch):
    bundle = _ui_bundle()
    kind = re.search(r'CUSTOM_MODEL_DEVELOPMENT="(\w+)"', bundle).group(1)
    tag = "mlflow.experimentKind"
    assert f'"{tag}"===' in bundle  # the tag the UI reads to pick the experiment's view
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SUI_TRACKING_AGENT", "off")  # EXPERIMENT_NAME is patched below, in this process only
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    with tracking.stage_run("prepare", {}, session="kind"):
        pass
    assert client.get_experiment_by_name("sui").tags.get(tag) == kind
    # an experiment made before (without the tag) gets it
    old = client.create_experiment("sui-old")
    monkeypatch.setattr(tracking, "EXPERIMENT_NAME", "sui-old")
    with tracking.stage_run("prepare", {}, session="kind"):
        pass
    assert client.get_experiment(old).tags.get(tag) == kind
