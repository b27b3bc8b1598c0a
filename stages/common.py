"""What every stage module shares: params in, one MLflow child run, one-line errors, exit codes.

A stage module is a body function plus one line that makes it a command:

    '''DVC stage `score`: per-sample F-SI and SI from the leave-one-out deltas.'''

    from stages.common import Configs, StageRun, stage_app
    from sui_core import scores

    def body(cfg: Configs, run: StageRun) -> dict:
        result = scores.compute("data/loo", "data/scores", cfg.score)   # cfg.score: ScoreConfig
        run.log_artifacts("data/scores/plots", "plots")
        return {"fsi_mean": result.fsi.mean()}                          # logged as metrics

    app = stage_app("score", __doc__, body, sections=["score"])

    if __name__ == "__main__":
        app()

`python -m stages.score [--params params.yaml]` then loads params.yaml, validates the listed sections
(`sui_core.config.load_section`), opens the stage's MLflow child run (`sui_core.tracking.stage_run`:
the sections' params logged flattened as `section.key`, the whole params.yaml on the parent run),
calls `body`, logs the dict it returns as metrics, and exits:

- 0 on success;
- 1 on a `sui_core.errors.SuiError`, printed as ONE line `error: <message>` on stderr, no traceback;
  also on a full disk (OSError ENOSPC/EDQUOT: `error: <path>: no space left on device; ...`);
- 130 on Ctrl-C (KeyboardInterrupt), 143 on SIGTERM; the child run is then marked KILLED;
- any other exception is a bug: it propagates with its traceback (the child run is marked FAILED).

A stage that needs options of its own writes its typer command itself and calls `run_stage`:

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def jacobians(params: Path = params_option(), workers: int = 1):
        run_stage("jacobians", ["model", "jacobian"], lambda cfg, run: body(cfg, run, workers), params)

The `sui` CLI (stages/cli.py) picks up the single command of each stage module's `app`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

from sui_core import distributed as dist
from sui_core.config import as_dict, load_params, load_section
from sui_core.errors import SuiError
from sui_core.io import is_disk_full
from sui_core.tracking import NullStageRun, StageRun, stage_run

__all__ = ["Configs", "StageRun", "NullStageRun", "StageBody", "run_stage", "stage_app", "params_option",
           "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DEFAULT_PARAMS = Path("params.yaml")


class Configs(dict):
    """The validated config dataclass of each requested section, by name: `cfg["data"]` or `cfg.data`.

    `cfg.params` is the whole params.yaml as loaded (a dict), `cfg.params_path` its path.
    """

    def __init__(self, sections: Mapping[str, Any], params: dict[str, Any], params_path: Path):
        super().__init__(sections)
        self.params = params
        self.params_path = params_path

    def record(self) -> dict[str, Any]:
        """The validated params of this stage's sections, defaults filled in: what meta.json records."""
        return {name: as_dict(section) for name, section in self.items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"section {name!r} was not requested by this stage (have: {', '.join(self) or 'none'})"
            ) from None


StageBody = Callable[[Configs, Any], "Mapping[str, Any] | None"]


class StageTerminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so the run is closed as KILLED before the process exits."""


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocesses
    raise StageTerminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_configs(sections: list[str], params_path: str | Path = DEFAULT_PARAMS) -> Configs:
    """Load params.yaml and build the validated dataclass of each section (ParamError on problems)."""
    params_path = Path(params_path)
    params = load_params(params_path)
    return Configs({s: load_section(params, s) for s in sections}, params, params_path)


def run_stage(name: str, sections: list[str], body: StageBody,
              params_path: str | Path = DEFAULT_PARAMS, *, distributed: bool = False) -> dict[str, Any]:
    """Run one stage as described in the module docstring; return its metrics, or exit (SystemExit).

    Exit codes: 1 for a SuiError (one line `error: <message>` on stderr), 130 for KeyboardInterrupt,
    143 for SIGTERM. Other exceptions propagate.

    `distributed=True` (jacobians, loo): the stage can run as several processes (sui_core.distributed).
    With `compute.nproc` > 1 and not yet under torchrun, this process only launches `python -m
    <the body's module> --params ...` as nproc workers with torchrun's launcher and exits with their code.
    Under torchrun (started so, or by hand: `torchrun ... -m stages.<name>`) the process group is
    joined after the params are validated; rank 0 alone logs to MLflow (the others get a
    NullStageRun) and prints; an error agreed between ranks is printed once.
    """
    started = time.monotonic()
    # before the process group is up, only torchrun's rank 0 prints (every rank validates the same params)
    main, world_size = not (distributed and dist.launched()) or os.environ.get("RANK") == "0", 1
    try:
        with _sigterm_raises():
            cfg = load_configs(sections, params_path)
            if distributed:
                nproc = load_section(cfg.params, "compute").nproc
                if nproc > 1 and not dist.launched():
                    print(f"{name}: {nproc} processes (torch.distributed)", file=sys.stderr, flush=True)
                    code = dist.launch(_module_of(body), ["--params", str(params_path)], nproc)
                    if code:
                        raise SystemExit(code)
                    return {}
                rank, world_size = dist.init_from_env()
                main = rank == 0
            stage_params = {s: as_dict(c) for s, c in cfg.items()}
            tracked = (stage_run(name, stage_params, all_params=cfg.params) if main
                       else contextlib.nullcontext(NullStageRun(name)))
            with tracked as run:
                metrics = dict(body(cfg, run) or {})
                if metrics:
                    run.log_metrics(metrics)
    except SuiError as exc:
        if main or not getattr(exc, "agreed", False):
            print(f"error: {_one_line(str(exc))}", file=sys.stderr, flush=True)
        dist.finish_after_error(exc)
        raise SystemExit(EXIT_ERROR) from None
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        where = exc.filename or f"the {name} stage's output"
        print(f"error: {where}: no space left on device; free disk space, or check what the params need "
              f"with `sui plan`", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_ERROR) from None
    except StageTerminated:
        if main:
            print(f"{name}: terminated", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_TERMINATED) from None
    except KeyboardInterrupt:
        if main:
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        if distributed:
            dist.shutdown()
    if main:
        processes = f" ({world_size} processes)" if world_size > 1 else ""
        print(f"{name}: done in {time.monotonic() - started:.1f} s{processes}", file=sys.stderr, flush=True)
    return metrics


def _module_of(body: StageBody) -> str:
    """The importable module that defines `body` (`stages.loo` also when run as `python -m stages.loo`)."""
    module = getattr(body, "__module__", None) or "__main__"
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise RuntimeError("a distributed stage must be started as `python -m <module>` or `sui <stage>`")
        module = spec.name
    return module


def params_option() -> Any:
    """The `--params/-p PATH` option every stage command takes (default params.yaml in the cwd)."""
    return typer.Option(DEFAULT_PARAMS, "--params", "-p", help="params.yaml to read.", dir_okay=False)


def stage_app(name: str, help: str | None, body: StageBody, sections: list[str],
              distributed: bool = False) -> typer.Typer:
    """A typer app with the one command `name`: `python -m stages.<name> [--params PATH]`.

    `distributed`: see `run_stage`."""
    app = typer.Typer(name=name, help=help, add_completion=False, pretty_exceptions_enable=False)

    def command(params: Path = params_option()) -> None:
        run_stage(name, sections, body, params, distributed=distributed)

    command.__doc__ = help
    command.__name__ = name
    app.command(name=name, help=help)(command)
    return app
