#!/usr/bin/env bash
# GPU check (issue 16 item 6): sui's jacobians + ntk + loo with the network on CUDA against the CPU path,
# with times (bench/gpu_check.py; about 5 minutes on one GPU and 16 cores, estimated, not yet run there).
#
#   bash bench/gpu_check.sh                        # the check: fails loudly when torch sees no CUDA device
#   bash bench/gpu_check.sh --device cpu --small   # smoke test without a GPU; any gpu_check.py arguments pass on
#
# Python: the first of these whose torch sees CUDA (with --device cpu: whose torch imports), else one made:
#   1. .venv/bin/python (run.sh's environment, when it was carried or built here);
#   2. .cache/gpu-venv: a venv over python3's own site-packages (--system-site-packages), so a system torch
#      built for CUDA is used as it is; made when python3's torch sees CUDA, and given with pip (pins of
#      requirements.lock, torch never reinstalled) only the modules gpu_check.py imports that it lacks:
#      numpy scipy pyarrow tqdm pyyaml pillow torchvision (torchvision with --no-deps, so torch stays);
#   3. else .cache/gpu-venv from requirements.lock in full, as run.sh builds .venv (the torch wheel of the
#      package index ships with CUDA): several GB to download.
# sui itself is not installed: PYTHONPATH is the repository root. Data: Fashion-MNIST from
# /usr/share/datasets/fashion-mnist when present, else synthetic (gpu_check.py says which).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.cache/gpu-venv"
WANT_CUDA=1
[[ " $* " == *" --device cpu "* ]] && WANT_CUDA=0

die() {
  echo "gpu_check.sh: error: $*" >&2
  exit 2
}

usable() {
  # $1: a python; true if its torch imports and (unless --device cpu) sees a CUDA device
  [[ -x "$1" ]] || command -v "$1" >/dev/null 2>&1 || return 1
  "$1" -c "import sys, torch; sys.exit(0 if $WANT_CUDA == 0 or torch.cuda.is_available() else 1)" 2>/dev/null
}

pin() {
  # the requirements.lock line of package $1 (name==version), or the bare name if it is not pinned there
  grep -i -m1 "^$1==" requirements.lock || echo "$1"
}

fill_missing() {
  # install into $VENV the modules gpu_check.py imports that its python lacks (torch excepted)
  local py="$VENV/bin/python" module package missing=()
  for module in numpy scipy pyarrow tqdm yaml PIL; do
    package=$module
    [[ $module == yaml ]] && package=pyyaml
    [[ $module == PIL ]] && package=pillow # torchvision's
    "$py" -c "import $module" 2>/dev/null || missing+=("$(pin "$package")")
  done
  if ((${#missing[@]})); then
    echo "gpu_check.sh: installing ${missing[*]} into $VENV" >&2
    "$py" -m pip install "${missing[@]}" || die "pip install ${missing[*]} failed"
  fi
  if ! "$py" -c "import torchvision" 2>/dev/null; then
    echo "gpu_check.sh: installing $(pin torchvision) (--no-deps: keeps the system torch) into $VENV" >&2
    "$py" -m pip install --no-deps "$(pin torchvision)" || die "pip install torchvision failed"
  fi
}

if ((WANT_CUDA)) && [[ ! -e /dev/nvidia0 ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  die "no NVIDIA GPU here (no /dev/nvidia0, nvidia-smi fails): the check needs CUDA; --device cpu runs the smoke test"
fi

PY=""
if usable "$ROOT/.venv/bin/python"; then
  PY="$ROOT/.venv/bin/python"
elif usable "$VENV/bin/python"; then
  PY="$VENV/bin/python"
  fill_missing
elif usable python3; then
  echo "gpu_check.sh: python3's torch $(python3 -c 'import torch; print(torch.__version__)') is usable:" \
    "a venv over it in $VENV" >&2
  python3 -m venv --system-site-packages "$VENV" || die "python3 -m venv $VENV failed"
  PY="$VENV/bin/python"
  fill_missing
else
  command -v python3 >/dev/null 2>&1 || die "python3 not found (need Python >= 3.11)"
  echo "gpu_check.sh: no torch with CUDA found: $VENV from requirements.lock (several GB)" >&2
  python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
  "$VENV/bin/python" -m pip install -r requirements.lock || die "pip install -r requirements.lock failed"
  PY="$VENV/bin/python"
fi

"$PY" - "$WANT_CUDA" <<'EOF' || die "no CUDA device: torch.cuda.is_available() is False (the check needs a GPU; --device cpu runs the smoke test)"
import sys, torch
print(f"gpu_check.sh: {sys.executable}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}", file=sys.stderr)
sys.exit(0 if sys.argv[1] == "0" or torch.cuda.is_available() else 1)
EOF

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py "$@"
