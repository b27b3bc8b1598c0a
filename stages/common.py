"""What every stage module shares: params in, one MLflow child run, one-line errors, exit codes.

A stage module is a body function plus one line that makes it a command:

    '''DVC stage `score`: per-sample F-SI and SI from the leave-one-out deltas.'''

    from stages.common import Configs, StageRun, stage_app
    from sui_core.linearized import scores

    def body(cfg: Configs, run: StageRun) -> dict:
        result = scores.compute("data/loo", "data/scores", cfg.score)   # cfg.score: ScoreConfig
        run.log_artifacts("data/scores/plots", "plots")
        return {"fsi_mean": result.fsi.mean()}                          # logged as metrics

    app = stage_app("score", __doc__, body, sections=["score"])

    if __name__ == "__main__":
        app()

`python -m stages.score [--params params.yaml]` then loads params.yaml, validates the listed sections
(`sui_core.config.load_section`), opens the stage's MLflow child run (`stages.tracking.stage_run`:
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
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer
import yaml

from stages import distributed as dist
from stages import paths
from stages.tracking import NullStageRun, StageRun, stage_run
from sui_core import artifacts
from sui_core.config import as_dict, load_params, load_section
from sui_core.errors import ParamError, SuiError
from sui_core.io import checked_publish, code_version, file_sha256, is_disk_full, write_json

__all__ = [
    "Configs",
    "StageRun",
    "NullStageRun",
    "StageBody",
    "run_stage",
    "stage_app",
    "params_option",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DEFAULT_PARAMS = Path("params.yaml")


class Configs(dict):
    """The validated config dataclass of each requested section, by name: `cfg["data"]` or `cfg.data`.

    `cfg.params` is the whole params.yaml as loaded (a dict), `cfg.params_path` its path and `cfg.raw` its
    bytes as read; `cfg.tracked` the params DVC tracks for this stage (`cfg.tracked_keys`: dvc.yaml's
    `params:` of the stage, or all requested sections for a stage dvc.yaml does not list), validated,
    {section: {key: value}}: what its outputs record.

    Inputs are read through `cfg.input(folder)` (hashes and recorded params checked against
    `cfg.tracked`, `sui_core.artifacts.open_output`) and outputs finished with `cfg.publish(folder)`,
    which records this stage's tracked params and the lineage of every input it opened.
    """

    def __init__(
        self,
        sections: Mapping[str, Any],
        params: dict[str, Any],
        params_path: Path,
        tracked_keys: list[str],
        raw: bytes | None,
        stage: str = "",
    ):
        super().__init__(sections)
        self.params = params
        self.params_path = params_path
        self.tracked_keys = tracked_keys
        self.tracked = tracked_params(params, tracked_keys)
        self.raw = raw
        self.stage = stage
        self.inputs: list[artifacts.Output] = []

    def input(self, folder: str | Path) -> artifacts.Output:
        """Open an upstream output, checked (files' sha256, its recorded params vs this stage's)."""
        opened = artifacts.open_output(folder, self.tracked, stage=dvc_writer(folder))
        self.inputs.append(opened)
        return opened

    def publish(self, folder: str | Path, **extra: Any) -> dict[str, Any]:
        """Write meta.json into `folder` (last, inside its atomic_dir): tracked params, lineage, hashes."""
        return artifacts.publish(folder, self.stage, self.tracked, self.inputs, **extra)

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


def error_line(exc: SuiError, params_path: str | Path = DEFAULT_PARAMS) -> str:
    """The one line a user sees: `error: <message>`, a param's error prefixed by the params file's name."""
    message = _one_line(str(exc))
    if isinstance(exc, ParamError) and exc.key != str(params_path):
        message = f"{Path(params_path).name}: {message}"
    return f"error: {message}"


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


def dvc_stages(dvc_yaml: Path = paths.DVC_YAML) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages in order, {name: entry (cmd, deps, params, outs)}; {} without a dvc.yaml."""
    if not dvc_yaml.is_file():
        return {}
    try:
        spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SuiError(f"{dvc_yaml}: not valid YAML ({_one_line(str(exc))})") from exc
    return {name: entry for name, entry in (spec.get("stages") or {}).items() if isinstance(entry, dict)}


def dvc_stage(stage: str) -> dict[str, Any] | None:
    """dvc.yaml's entry for `stage`; None when it has no such stage."""
    return dvc_stages().get(stage)


def _names(entries: list[Any] | None) -> list[str]:
    """dvc.yaml list entries as names: `- data` or `- data/metrics/x.json: {cache: false}` or `- file: [keys]`."""
    names: list[str] = []
    for entry in entries or []:
        names += [entry] if isinstance(entry, str) else list(entry)
    return names


def dvc_writer(folder: str | Path) -> str | None:
    """The dvc.yaml stage whose outs include `folder` (for messages: "run the prepare stage first")."""
    writers = (name for name, entry in dvc_stages().items() if Path(folder) in map(Path, _names(entry.get("outs"))))
    return next(writers, None)


def finite_numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among the top-level values: what a stage logs as metrics (flags, names left out)."""
    return {
        key: value
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def dvc_stage_params(stage: str) -> list[str] | None:
    """The `params:` keys dvc.yaml lists for `stage` (`data`, `training.lr`); None when it has no such stage."""
    entry = dvc_stage(stage)
    if entry is None:
        return None
    keys: list[str] = []
    for item in entry.get("params") or []:
        keys += [item] if isinstance(item, str) else [k for names in item.values() for k in names]
    return keys


def tracked_params(params: dict[str, Any], keys: list[str]) -> dict[str, dict[str, Any]]:
    """The validated values of `keys` (whole sections or `section.key`), {section: {key: value}}."""
    tracked: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, _, field = key.partition(".")
        values = as_dict(load_section(params, section))
        if not field:
            tracked[section] = values
        elif field in values:
            tracked.setdefault(section, {})[field] = values[field]
        else:
            raise SuiError(
                f"{paths.DVC_YAML}: a stage tracks param {key}, which params.yaml's section {section} does not have"
            )
    return tracked


def load_configs(sections: list[str], params_path: str | Path = DEFAULT_PARAMS, stage: str = "") -> Configs:
    """Load params.yaml and build the validated dataclass of each section (ParamError on problems), and
    the params dvc.yaml tracks for `stage`."""
    params_path = Path(params_path)
    raw = _read_bytes(params_path)
    params = load_params(params_path)
    if _read_bytes(params_path) != raw:
        raise ParamError(str(params_path), "changed while it was being read; run the stage again")
    keys = dvc_stage_params(stage)
    sections_cfg = {s: load_section(params, s) for s in sections}
    return Configs(sections_cfg, params, params_path, sections if keys is None else keys, raw, stage)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def params_unchanged(cfg: Configs) -> Callable[[], None]:
    """A check that params.yaml still gives this stage the tracked params it started with.

    DVC records a stage's params by reading params.yaml *after* the stage ran, and does not lock it
    while the stage runs: `dvc exp run --temp` (and a user's editor) may rewrite it meanwhile. An output
    computed from params DVC would not record must not be published, so this runs before every rename
    into place (`sui_core.io.checked_publish`) and once more when the body returns (then DVC sees the
    stage fail and records nothing). Unchanged bytes are the fast path; a change elsewhere in the file
    (another stage's section) is fine.
    """

    def check() -> None:
        if _read_bytes(cfg.params_path) == cfg.raw:
            return
        try:
            now = artifacts.flatten(tracked_params(load_params(cfg.params_path), cfg.tracked_keys))
        except SuiError as exc:
            raise ParamError(
                str(cfg.params_path),
                f"changed while the {cfg.stage} stage ran and no longer loads "
                f"({_one_line(str(exc))}); nothing was recorded: run the stage again",
            ) from None
        before = artifacts.flatten(cfg.tracked)
        for key in sorted(before.keys() | now.keys()):
            if artifacts.canonical(before.get(key)) != artifacts.canonical(now.get(key)):
                raise ParamError(
                    key,
                    f"changed while the {cfg.stage} stage ran ({before.get(key)!r} when it "
                    f"started, {now.get(key)!r} now): nothing was recorded; run the stage again",
                )

    return check


def write_provenance(stage: str, processes: int, work_s: float) -> None:
    """What code made this stage's outputs, kept outside them (output hashes must not change with the
    commit): `.sui/provenance/<stage>.json`, beside the sha256 of each output's record (dvc.yaml's outs)
    and `work_s`, the seconds the stage's body ran (without starting Python, imports, params and opening
    tracking: bench/bench_overhead.py subtracts it from the wall time to get the fixed cost)."""
    entry = dvc_stage(stage) or {}
    records = {}
    for out in map(Path, _names(entry.get("outs")) + _names(entry.get("metrics"))):
        record = out / artifacts.META_NAME if out.is_dir() else out
        if record.is_file():
            records[str(out)] = file_sha256(record)
    write_json(
        paths.PROVENANCE / f"{stage}.json",
        {
            "stage": stage,
            "outputs": records,
            "code": code_version(),
            "processes": processes,
            "work_s": round(work_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def run_stage(
    name: str,
    sections: list[str],
    body: StageBody,
    params_path: str | Path = DEFAULT_PARAMS,
    *,
    distributed: bool = False,
) -> dict[str, Any]:
    """Run one stage as described in the module docstring; return its metrics, or exit (SystemExit).

    Exit codes: 1 for a SuiError (one line `error: <message>` on stderr), 130 for KeyboardInterrupt,
    143 for SIGTERM. Other exceptions propagate.

    `distributed=True` (jacobians, loo): the stage can run as several processes (stages.distributed).
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
            cfg = load_configs(sections, params_path, name)
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
            tracked = (
                stage_run(name, stage_params, all_params=cfg.params)
                if main
                else contextlib.nullcontext(NullStageRun(name))
            )
            with tracked as run:
                unchanged = params_unchanged(cfg)
                with checked_publish(unchanged):
                    work_started = time.monotonic()
                    metrics = dict(body(cfg, run) or {})
                    work_s = time.monotonic() - work_started
                unchanged()  # after the last rename too: DVC records the params once the stage has exited
                if metrics:
                    run.log_metrics(metrics)
            if main:
                write_provenance(name, world_size, work_s)
    except SuiError as exc:
        if main or not getattr(exc, "agreed", False):
            print(error_line(exc, params_path), file=sys.stderr, flush=True)
        dist.finish_after_error(exc)
        raise SystemExit(EXIT_ERROR) from None
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        where = exc.filename or f"the {name} stage's output"
        print(
            f"error: {where}: no space left on device; free disk space, or check what the params need with `sui plan`",
            file=sys.stderr,
            flush=True,
        )
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


def stage_app(
    name: str, help: str | None, body: StageBody, sections: list[str], distributed: bool = False
) -> typer.Typer:
    """A typer app with the one command `name`: `python -m stages.<name> [--params PATH]`.

    `distributed`: see `run_stage`."""
    app = typer.Typer(name=name, help=help, add_completion=False, pretty_exceptions_enable=False)

    def command(params: Path = params_option()) -> None:
        run_stage(name, sections, body, params, distributed=distributed)

    command.__doc__ = help
    command.__name__ = name
    app.command(name=name, help=help)(command)
    return app
