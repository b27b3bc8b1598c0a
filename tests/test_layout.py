"""The library/pipeline boundary: sui_core knows nothing of DVC, MLflow or the pipeline's files."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "sui_core").rglob("*.py"))

BLOCKED_IMPORTS = """
import importlib, pkgutil, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "dvc", "psutil", "stages"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Blocked())
import sui_core
for module in pkgutil.walk_packages(sui_core.__path__, "sui_core."):
    importlib.import_module(module.name)
print("imported", len(sys.modules))
"""


def test_every_library_module_imports_without_dvc_mlflow_psutil_or_the_pipeline():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_library_module_imports_pipeline_packages_even_lazily():
    pattern = re.compile(r"^\s*(import|from)\s+(mlflow|dvc|psutil|stages)\b", re.M)
    found = [
        f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
        for path in LIBRARY
        for m in pattern.finditer(path.read_text())
    ]
    assert not found, found


def test_no_library_module_names_the_pipelines_files():
    """Where a stage reads and writes (data/…, params.yaml) is the pipeline's business (stages/paths.py)."""
    pattern = re.compile(
        r"params\.yaml|[\"'`(\s]data/(prepared|model|pretrain|jacobians|ntk|loo|scores|evaluate|"
        r"validate|metrics)\b"
    )
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in LIBRARY
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
