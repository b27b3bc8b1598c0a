"""Where each stage reads and writes, relative to the repo root (the same paths as in dvc.yaml)."""

from pathlib import Path

DATA = Path("data")
PREPARED = DATA / "prepared"
MODEL = DATA / "model"
PRETRAIN = DATA / "pretrain"  # the body trained on a disjoint task (model.pretrain)
JACOBIANS = DATA / "jacobians"
NTK = DATA / "ntk"
LOO = DATA / "loo"
SCORES = DATA / "scores"
EVALUATE = DATA / "evaluate"
SUSPECTS = DATA / "suspects"
ATTRIBUTION = DATA / "attribution"
VALIDATE = DATA / "validate"
METRICS = DATA / "metrics"  # small JSON files DVC tracks in git as metrics

BASIS_FILE = NTK / "basis.npz"
RESIDUAL_FILE = NTK / "residual.npz"
FORMS_FILE = LOO / "forms.parquet"
GROUPS_FILE = LOO / "groups.parquet"
SCORES_FILE = SCORES / "scores.parquet"
GROUP_SCORES_FILE = SCORES / "groups.parquet"
SUSPECTS_FILE = SUSPECTS / "suspects.parquet"
INFLUENCES_FILE = ATTRIBUTION / "influences.parquet"
EFFECTS_FILE = ATTRIBUTION / "effects.parquet"

DVC_YAML = Path("dvc.yaml")
PROVENANCE = Path(".sui") / "provenance"  # what code made each stage's outputs (not an output: see stages/common.py)
