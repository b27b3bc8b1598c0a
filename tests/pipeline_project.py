"""A small git + DVC copy of the project in a temp folder, for the end-to-end tests that run DVC there
(test_pipeline.py, test_concurrency.py): never in the checkout's own data/."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SMALL = {
    "data": {"source": "sklearn_digits", "classes": [3, 8], "max_train": 120, "label_noise": 0.1},
    "model": {"hidden": [64]},
    "jacobian": {"projection": "coordinates", "dims_per_tensor": 150, "batch_size": 32},
    "training": {"lr": 0.05, "t": 300},
}
# every stage of dvc.yaml that writes outputs, in the order `dvc repro` runs them (track comes last)
ALL_STAGES = [
    "prepare",
    "pretrain",
    "model",
    "jacobians",
    "ntk",
    "loo",
    "score",
    "evaluate",
    "suspects",
    "attribute",
    "validate",
]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [
        f
        for f in out.splitlines()
        if f.split("/")[0]
        in {"dvc.yaml", "params.yaml", "stages", "sui_core", ".dvc", ".dvcignore", "data", ".gitignore"}
    ]


def env_for(project: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env["PYTHONPATH"] = str(project)
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env[key] = "sui-test"
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env[key] = "sui-test@localhost"
    return env


def run(cmd: list[str], project: Path) -> str:
    proc = subprocess.run(cmd, cwd=project, env=env_for(project), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def stages_ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def make_project(project: Path, params: dict = SMALL) -> Path:
    """Copy the tracked project files to `project`, update params.yaml's sections with `params`, and
    commit it all to a fresh git repository there (nothing run yet)."""
    for rel in tracked_files():
        dest = project / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
    values = yaml.safe_load((project / "params.yaml").read_text())
    for section, changes in params.items():
        values[section].update(changes)
    (project / "params.yaml").write_text(yaml.safe_dump(values))
    run(["git", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "test project"], project)
    return project
