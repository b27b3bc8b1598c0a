"""The tracking agent: one process that keeps MLflow imported and its stores open for the stages.

Why: importing MLflow 3.17 and opening its sqlite store take 3–4 s (MLflow imports its GenAI, gateway
and pandas modules, sqlalchemy and alembic), and DVC starts every stage as a new Python process. Paid by
each of the default pipeline's twelve stages, that was 46 of the 96 s of `dvc repro -f` (measured
2026-12-07, docs/results.md "Fixed cost per stage"). Through the agent a stage's tracking is a few
socket round trips; the first stage of a session that finds no agent starts one and waits for it.

What runs where: the stage computes everything that depends on its own process (environment, process
tree, git commit: `tracking.session_facts`), and sends each MLflow call as one request naming an entry
of `tracking.STORE_CALLS` with plain-data arguments (JSON); the agent runs it on its MlflowClient for the
request's URI and answers the result, or the TrackingError / ArtifactError line the call raised, which
the stage raises again. So the MLflow calls, their errors and the runs they make are those of the
in-process path (`SUI_TRACKING_AGENT=off`, `tracking.LocalStore`), which the agent itself uses.

One agent per user, Python, checkout and MLflow environment (`agent_key`: the interpreter, this
package's folder and its tracking code, the MLFLOW_* variables but the URI), serving every tracking URI:
its socket and lock live in `<tmp>/sui-tracking-<uid>/` (mode 0700). It answers one request at a time,
one connection each, and exits after IDLE_EXIT_S without a request. A stage keeps the client of its
first call (`pin`) for all its later ones: an mlflow.db deleted or replaced while the stage runs makes
its calls fail as they do in one process, instead of logging into a fresh file; a new stage gets a
client of the file as it is now (`_ClientCache`). Starting: under the lock (flock, held by the agent
for its whole life) a second agent exits at once; a stage whose connection is refused starts one and
polls the socket for up to START_TIMEOUT_S. If the agent cannot be started the stage falls back to the
in-process store with one warning line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sui_core.errors import ArtifactError, TrackingError

IDLE_EXIT_S = 120.0
START_TIMEOUT_S = 120.0  # importing MLflow on a loaded machine: up to tens of seconds
_PACKAGE = Path(__file__).resolve().parent
_ERRORS = {"TrackingError": TrackingError, "ArtifactError": ArtifactError}


def agent_dir() -> Path:
    """`<tmp>/sui-tracking-<uid>`, made with mode 0700 (requests are only accepted from this user)."""
    folder = Path(tempfile.gettempdir()) / f"sui-tracking-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{folder}: not a private folder of this user")
    return folder


def agent_key() -> str:
    """Which agent serves this process: same interpreter, same checkout and code, same MLflow settings."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("MLFLOW_") and k != "MLFLOW_TRACKING_URI")
    code = b"".join((_PACKAGE / name).read_bytes() for name in ("tracking.py", "tracking_agent.py"))
    text = json.dumps([sys.executable, str(_PACKAGE), hashlib.sha256(code).hexdigest(), env])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _paths(key: str) -> tuple[Path, Path, Path]:
    folder = agent_dir()
    return folder / f"{key}.sock", folder / f"{key}.lock", folder / f"{key}.log"


# --------------------------------------------------------------------------------------------------
# the stage's side


def _exchange(sock_path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Send one request, read its answer; OSError (ConnectionError included) when the agent is not there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(sock_path))
        conn.sendall(json.dumps(request, default=str).encode())  # default: a YAML date, logged as its str
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(1 << 16):
            chunks.append(chunk)
    if not chunks:
        raise ConnectionResetError("the tracking agent closed the connection without an answer")
    return json.loads(b"".join(chunks))


def _start_agent(key: str) -> subprocess.Popen:
    from stages.tracking import MLFLOW_HTTP_BOUNDS

    _, _, log = _paths(key)
    path = os.pathsep.join(p for p in (str(_PACKAGE.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**MLFLOW_HTTP_BOUNDS, **os.environ, "PYTHONPATH": path}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stages.tracking_agent", key],
            cwd=_PACKAGE.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # a Ctrl-C or kill of the stage's process group leaves it alone
        )


class AgentStore:
    """The store calls (`tracking.STORE_CALLS`) sent to the tracking agent; see the module docstring."""

    def __init__(self, uri: str):
        self.uri = uri
        self.pin: str | None = None  # the agent's client of this store for the first call: kept for the rest
        self._fallback = None

    def call(self, name: str, **kwargs: Any) -> Any:
        if self._fallback is not None:
            return self._fallback.call(name, **kwargs)
        request = {"call": name, "uri": self.uri, "pin": self.pin, "kwargs": kwargs}
        try:
            answer = self._send(request)
        except OSError as exc:
            from stages.tracking import LocalStore

            print(f"warning: tracking agent not available ({exc}); MLflow runs in this process", file=sys.stderr)
            self._fallback = LocalStore(self.uri)
            return self._fallback.call(name, **kwargs)
        self.pin = answer.get("pin", self.pin)
        if "error" in answer:
            error = answer["error"]
            raise _ERRORS.get(error["type"], TrackingError)(error["message"])
        return answer["result"]

    def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        key = agent_key()
        sock_path, _, log = _paths(key)
        with contextlib.suppress(OSError):
            return _exchange(sock_path, request)
        started = _start_agent(key)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                return _exchange(sock_path, request)
            except OSError:
                code = started.poll()
                if code not in (None, 0):
                    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
                    raise OSError(f"it exited with {code}: {lines[-1] if lines else 'no output'}; log {log}") from None
                if time.monotonic() > deadline:
                    raise OSError(f"no answer within {START_TIMEOUT_S:g} s; log {log}") from None
                if code == 0:  # another agent held the lock: it may be the one that is just exiting, idle
                    started = _start_agent(key)
                time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# the agent's side


class _ClientCache:
    """MlflowClients by (URI, identity of its sqlite file): a stage's pin names the client it started with."""

    def __init__(self):
        self._clients: dict[str, Any] = {}

    @staticmethod
    def _identity(uri: str) -> str:
        from stages.tracking import _sqlite_path

        db = _sqlite_path(uri)
        if db is None:
            return uri
        try:
            info = db.stat()
        except OSError:
            return f"{uri} (absent)"
        return f"{uri} ({info.st_dev}:{info.st_ino})"

    def client(self, uri: str, pin: str | None) -> tuple[str, Any]:
        from stages.tracking import _client

        if pin is not None and pin in self._clients:
            return pin, self._clients[pin]
        key = self._identity(uri)
        if key not in self._clients:
            opened = _client(uri)
            key = self._identity(uri)  # of the file MLflow has just made, when it was absent
            self._clients[key] = opened
        return key, self._clients[key]


def _answer(clients: _ClientCache, request: dict[str, Any]) -> dict[str, Any]:
    from stages.tracking import STORE_CALLS

    pin = request.get("pin")
    try:
        pin, client = clients.client(request["uri"], pin)
        return {"result": STORE_CALLS[request["call"]](client, **request["kwargs"]), "pin": pin}
    except (TrackingError, ArtifactError) as exc:
        return {"error": {"type": type(exc).__name__, "message": str(exc)}, "pin": pin}
    except Exception as exc:  # a bug, not the store: say so in the same one line
        message = " ".join(str(exc).split())[:300]
        return {"error": {"type": "TrackingError", "message": f"tracking agent: {type(exc).__name__}: {message}"}}


def serve(key: str) -> None:
    """Hold the lock, listen on the socket, answer requests until IDLE_EXIT_S pass without one."""
    sock_path, lock_path, _ = _paths(key)
    lock = open(lock_path, "a")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another agent serves this key
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # who serves: for a user (and the tests) to find it
    lock.flush()
    from stages.tracking import _quiet_mlflow

    _quiet_mlflow()  # import MLflow before listening: the first request is then answered at full speed
    clients = _ClientCache()
    sock_path.unlink(missing_ok=True)  # left by an agent that was killed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock_path))
        server.listen(64)
        server.settimeout(IDLE_EXIT_S)
        try:
            while True:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    break
                with conn, contextlib.suppress(OSError, ValueError):
                    conn.settimeout(None)
                    chunks = []
                    while chunk := conn.recv(1 << 16):
                        chunks.append(chunk)
                    conn.sendall(json.dumps(_answer(clients, json.loads(b"".join(chunks)))).encode())
        finally:
            sock_path.unlink(missing_ok=True)


if __name__ == "__main__":
    serve(sys.argv[1])
