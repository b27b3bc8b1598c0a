"""Every module whose code can change a stage's results is one of that stage's deps in dvc.yaml, so that
editing it reruns the stages it affects (and only DVC's own bookkeeping decides what is stale).

The modules a stage runs are found statically: the `import` statements (at any depth: lazy imports
inside functions count) of `stages/<module>.py` named by its `cmd`, followed transitively through
`sui_core/` and `stages/`. Dynamic imports (importlib) are not seen.
"""

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sui_core", "stages")

# Infrastructure that does not change results: paths, params loading and validation, atomic writes,
# hash checks, tracking, process groups, errors and the CLI. Deliberately not a dep (editing it must not
# rerun the pipeline) and not followed either: what it imports serves that infrastructure (config.py
# imports sui_core.network.models only to validate an architecture name). Keep in step with dvc.yaml's header.
NOT_DEPS = frozenset(
    {
        "sui_core/__init__.py",
        "sui_core/io.py",
        "sui_core/config.py",
        "stages/tracking.py",
        "stages/tracking_agent.py",
        "stages/distributed.py",
        "sui_core/errors.py",
        "sui_core/artifacts.py",
        "stages/plan.py",
        "stages/__init__.py",
        "stages/common.py",
        "stages/paths.py",
        "stages/cli.py",
    }
)

# Lazy imports (inside one function) that only some stages' code takes, followed for those alone:
# sui_core.data.splits.load_source loads the raw data with sources.py (which loads text.py) and adversarial.py
# for prepare. pretrain calls it too, but only for a built-in source (pretrain.source is validated so)
# and without data.adversarial: neither module runs. Every other stage reads the prepared splits with
# data.read_split, which needs neither. test_the_import_graph_is_followed checks each edge is lazy.
ONLY_FOR = {
    ("sui_core/data/splits.py", "sui_core/data/sources.py"): {"prepare"},
    ("sui_core/data/splits.py", "sui_core/data/adversarial.py"): {"prepare"},
}


def imported_modules(source: Path, lazy_only: bool = False) -> set[str]:
    """Repo-relative paths of the project modules `source` imports (anywhere in the file, or with
    `lazy_only` only inside functions)."""
    tree = ast.parse(source.read_text(), filename=str(source))
    nodes = ast.walk(tree)
    if lazy_only:
        nodes = (
            node
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(fn)
        )
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from sui_core import plots` names a module; `from sui_core.linearized.ntk import Basis` a name in one
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            path = Path(*name.split(".")).with_suffix(".py")
            if name.split(".")[0] in PACKAGES and (ROOT / path).is_file():
                found.add(path.as_posix())
    return found


def stage_code(stage: str, module: str) -> set[str]:
    """Stage `stage`'s module and every project module it reaches, less the NOT_DEPS (not followed)."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen or current in NOT_DEPS:
            continue
        seen.add(current)
        todo.extend(
            imported
            for imported in imported_modules(ROOT / current)
            if stage in ONLY_FOR.get((current, imported), {stage})
        )
    return seen


def pipeline() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.fullmatch(r"python -m (stages\.\w+)", stage["cmd"].strip())
    assert match, f"unexpected cmd {stage['cmd']!r}"
    return match.group(1).replace(".", "/") + ".py"


def test_every_module_that_changes_results_is_a_dep():
    missing = [
        f"{name}: {module}"
        for name, stage in pipeline().items()
        for module in sorted(stage_code(name, stage_module(stage)) - set(stage.get("deps", [])))
    ]
    assert not missing, (
        "add to the stage's deps in dvc.yaml (or to NOT_DEPS if it cannot change results):\n" + "\n".join(missing)
    )


def test_the_import_graph_is_followed():
    """The walk itself: through stage modules, lazy imports and ONLY_FOR's edges for their stages."""
    code = stage_code("evaluate", "stages/evaluate.py")
    assert {
        "sui_core/studies/evaluate.py",
        "sui_core/plots.py",
        "sui_core/linearized/solver.py",
        "sui_core/data/splits.py",
    } <= code
    assert not code & NOT_DEPS
    assert "sui_core/linearized/jacobians.py" in stage_code("ntk", "stages/ntk.py")
    assert {"sui_core/data/sources.py", "sui_core/data/text.py"} <= stage_code("prepare", "stages/prepare.py")
    assert "sui_core/data/sources.py" not in code
    for (importer, imported), stages in ONLY_FOR.items():
        assert imported in imported_modules(ROOT / importer, lazy_only=True), (importer, imported)
        assert stages <= set(pipeline()), stages


def test_dvc_yaml_header_names_the_same_exemptions():
    header = (ROOT / "dvc.yaml").read_text().split("\nstages:")[0]
    assert all(module in header for module in NOT_DEPS), sorted(m for m in NOT_DEPS if m not in header)
