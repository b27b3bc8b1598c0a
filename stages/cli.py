"""The `sui` command: `sui ui` (the MLflow UI on this pipeline's runs) and every pipeline stage.

Stage commands are registered lazily from STAGE_MODULES: `sui --help` lists each existing `stages.<name>`
with its module docstring without importing it; `sui <name> ...` imports the module and runs the single
command of its typer `app` (the same as `python -m stages.<name>`). A stage module that does not exist
yet is simply not listed; any other import error is raised, loudly.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

# ---- stage commands ------------------------------------------------------------------------------
# To add a stage: write stages/<name>.py with a module-level typer `app` holding one command (see
# stages/common.py: `app = stage_app(...)`) and list <name> here, in pipeline order.
STAGE_MODULES = [
    "prepare",
    "pretrain",
    "model",
    "jacobians",
    "ntk",
    "loo",
    "score",
    "evaluate",
    "attribute",
    "validate",
    "track",
]


def _module_name(name: str) -> str:
    return f"{__package__ or 'stages'}.{name}"


@functools.cache
def _stage_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The import spec of `stages.<name>` without importing it; None when the module does not exist."""
    try:
        return importlib.util.find_spec(_module_name(name))
    except ModuleNotFoundError:
        return None
    except ValueError:  # already imported, without a spec (e.g. made by hand)
        return importlib.machinery.ModuleSpec(_module_name(name), None)


def _stage_help(name: str) -> str | None:
    """The module docstring of `stages.<name>`, read without importing the module (fast `sui --help`)."""
    spec = _stage_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    except (OSError, SyntaxError, ValueError):
        return None


@functools.cache
def stage_command(name: str) -> click.Command | None:
    """The click command of `stages.<name>`, or None if that module does not exist (yet)."""
    module_name = _module_name(name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    app = getattr(module, "app", None)
    if app is None:
        raise RuntimeError(f"{module_name} has no typer `app` to register as `sui {name}`")
    command = typer.main.get_command(app)
    if isinstance(command, (click.Group, TyperGroup)):
        raise RuntimeError(f"{module_name}.app must hold exactly one command to be `sui {name}`")
    command.name = name
    return command


class _StageListing(click.Command):
    """What `sui --help` lists for a stage: name and docstring only; the module is not imported."""


class SuiGroup(TyperGroup):
    """The built-in commands, then the stage commands of STAGE_MODULES, imported only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(super().list_commands(ctx))
        names += [s for s in STAGE_MODULES if s not in names and _stage_spec(s) is not None]
        return names

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in STAGE_MODULES and _stage_spec(cmd_name) is not None:
            command = _StageListing(cmd_name, help=_stage_help(cmd_name))
        return command

    def resolve_command(self, ctx: click.Context, args: list[str]):
        cmd_name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, _StageListing):  # about to run (or show its own --help): load it for real
            command = stage_command(command.name)
            if command is None:
                ctx.fail(f"No such command {cmd_name!r}.")
        return cmd_name, command, rest


app = typer.Typer(
    name="sui",
    cls=SuiGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Smooth unique information of training samples. Run the pipeline with `dvc repro` (or
    `bash run.sh repro`); each stage is also a command here."""


# ---- sui ui --------------------------------------------------------------------------------------
SERVER_STOP_TIMEOUT_S = 10.0


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(1)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_process_group(proc: subprocess.Popen, timeout: float = SERVER_STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by `proc`; SIGKILL whatever is left after `timeout` seconds."""
    pgid = proc.pid
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    _killpg(pgid, signal.SIGKILL)
    proc.wait()
    while _group_alive(pgid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signum)


@app.command()
def ui(
    port: int = typer.Option(5000, "--port", "-p", help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (127.0.0.1: this machine only)."),
) -> None:
    """Serve the MLflow UI on this pipeline's runs (Ctrl-C to stop)."""
    from stages.tracking import _sqlite_path, runs_page, tracking_uri

    uri = tracking_uri()
    if uri.split(":", 1)[0] in ("http", "https", "databricks"):
        _fail(f"MLFLOW_TRACKING_URI is a tracking server already ({uri}): open it in a browser")
    if not _port_free(host, port):
        _fail(f"port {port} on {host} is in use (pass --port with a free one)")
    db = _sqlite_path(uri)
    cwd = db.parent if db else Path.cwd()
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.setdefault(  # printed by every start of this mlflow version; nothing a user can act on
        "PYTHONWARNINGS", "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated:UserWarning"
    )

    page = runs_page()  # before the server starts: it also creates the experiment on a new store
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    proc = None
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
        shown = f"[{host}]" if ":" in host else host
        typer.echo(f"MLflow UI: http://{shown}:{port}/{page}  (runs from {uri}; Ctrl-C to stop)", err=True)
        code = proc.wait()
    except _Stop:
        code = None
    finally:
        for s in previous:  # no second interruption while cleaning up
            signal.signal(s, signal.SIG_IGN)
        if proc is not None:
            stop_process_group(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code is None:  # stopped by the user
        typer.echo("MLflow UI stopped", err=True)
        return
    if code != 0:
        _fail(f"mlflow server exited with code {code}")


# ---- sui top -------------------------------------------------------------------------------------
@app.command()
def top(
    n: int = typer.Option(10, "--n", "-n", help="How many samples at each end."),
    score: str = typer.Option("fsi", "--score", help="fsi, si_isotropic, si_hessian or si_sgd."),
) -> None:
    """Print the most and least informative training samples of the latest scores (data/scores)."""
    from stages.common import error_line
    from stages.report import top_table
    from sui_core.errors import SuiError

    try:
        typer.echo(top_table(n, score))
    except SuiError as exc:
        _fail(error_line(exc).removeprefix("error: "))


# ---- sui suspects --------------------------------------------------------------------------------
@app.command()
def suspects(n: int = typer.Option(20, "--n", "-n", help="How many of the most suspect labels.")) -> None:
    """Print the training labels most likely wrong (data/suspects), with given and predicted label."""
    from stages.common import error_line
    from stages.report import suspects_table
    from sui_core.errors import SuiError

    try:
        typer.echo(suspects_table(n))
    except SuiError as exc:
        _fail(error_line(exc).removeprefix("error: "))


# ---- sui explain ---------------------------------------------------------------------------------
@app.command()
def explain(
    sample_id: int = typer.Argument(..., help="A sample id explained by the attribute stage (of attribute.split)."),
    n: int = typer.Option(10, "--n", "-n", help="How many proponents and opponents."),
    verify: bool = typer.Option(False, "--verify", help="Retrain the real network without the top proponent."),
) -> None:
    """Print which training samples made this validation (or test) prediction (data/attribution): its top
    proponents and opponents, each with the exact change of the prediction without it (linearized);
    --verify retrains the real network once without the top proponent (the recipe's t steps)."""
    from stages.common import error_line
    from stages.report import explain_table
    from sui_core.errors import SuiError

    try:
        typer.echo(explain_table(sample_id, n, verify))
    except SuiError as exc:
        _fail(error_line(exc).removeprefix("error: "))


# ---- sui plan ------------------------------------------------------------------------------------
@app.command()
def plan(
    params: Path = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read.", dir_okay=False),
) -> None:
    """Print each stage's expected disk use and peak memory for these params, without running anything;
    exit 1 when the largest peak does not fit in the available memory or the outputs on the free disk."""
    from stages import plan as planning
    from stages.common import error_line
    from sui_core.config import load_params
    from sui_core.errors import SuiError

    try:
        made = planning.make_plan(load_params(params))
        memory, disk = planning.available_memory(), planning.free_disk("data")
        planning.check(made, memory, disk)
    except SuiError as exc:
        _fail(error_line(exc, params).removeprefix("error: "))
    typer.echo(planning.table(made, memory, disk))


if __name__ == "__main__":
    app()
