"""DVC stage `track` (last, always run): put the metrics of the stages DVC did not run in this session
(restored from its run cache, or unchanged) on this session's MLflow parent run, read from their outputs,
and tag the parent `sui.restored`; so every `dvc exp run` appears in MLflow with its results. Cheap: no torch."""

import sys
from pathlib import Path

import typer

from stages import paths, tracking
from stages.common import dvc_stages, error_line, finite_numbers, params_option
from sui_core.config import load_params
from sui_core.errors import SuiError
from sui_core.io import read_json

NAME = "track"
# Where a stage's outputs hold its headline numbers, and under which key of that JSON file (None: the
# top level). The other stages' metrics (timings, score statistics) are not in their outputs.
METRIC_SOURCES: dict[str, tuple[Path, str | None]] = {
    "prepare": (paths.PREPARED / "meta.json", "summary"),
    "model": (paths.MODEL / "model.json", None),
    "ntk": (paths.NTK / "meta.json", None),
    "loo": (paths.LOO / "meta.json", None),
    "evaluate": (paths.METRICS / "evaluate.json", None),
    "suspects": (paths.METRICS / "suspects.json", None),
    "attribute": (paths.METRICS / "attribute.json", None),
    "validate": (paths.METRICS / "validate.json", None),
}


def stage_metrics(stage: str) -> dict[str, float]:
    """A stage's headline numbers as its outputs hold them ({} for a stage whose outputs hold none)."""
    if stage not in METRIC_SOURCES:
        return {}
    path, key = METRIC_SOURCES[stage]
    found = read_json(path)
    return finite_numbers((found.get(key) or {}) if key else found)


def track(params: Path = params_option()) -> None:
    """Log the metrics of the stages that did not run in this session on its MLflow parent run."""
    if not tracking.tracking_enabled():
        return
    try:
        stages = [name for name in dvc_stages() if name != NAME]  # those whose metrics the parent holds
        restored = tracking.log_restored(stages, stage_metrics, load_params(params))
    except SuiError as exc:
        print(error_line(exc, params), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if restored:
        print(
            f"{NAME}: not run in this session, metrics read from their outputs: {', '.join(restored)}",
            file=sys.stderr,
            flush=True,
        )


app = typer.Typer(name=NAME, help=__doc__, add_completion=False, pretty_exceptions_enable=False)
app.command(name=NAME, help=__doc__)(track)

if __name__ == "__main__":
    app()
