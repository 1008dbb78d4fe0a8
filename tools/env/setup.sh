#!/usr/bin/env bash
# Create or update the dcls-mm virtual environment (default: <repo>/.venv).
#
#   bash tools/env/setup.sh          # install what is missing; no-op when up to date
#   bash tools/env/setup.sh --check  # only verify, print what is wrong, exit 1 if broken
#
# Everything is pinned in requirements/stack.txt (used as pip constraints).
# Why each step looks the way it does (measured on our machines, see README "Quick start"):
# - every pip call ignores the machine's pip configuration, whose local "+cpu" torch
#   wheel would be preferred and breaks torchvision's compiled ops;
# - mmcv has no wheel on PyPI: it is built once from source WITH its compiled ops and
#   the wheel is cached (.cache/wheels, git-ignored, and ~/.cache/dcls-mm/wheels so
#   that a fresh clone on the same machine reuses it).
#
# Environment knobs: DCLS_MM_VENV (venv path), PYTHON (base interpreter),
# MAX_JOBS (mmcv build parallelism, default 2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${DCLS_MM_VENV:-$ROOT/.venv}
STACK=$ROOT/requirements/stack.txt
PY_BASE=${PYTHON:-python3}
STAMP=$VENV/.dcls_mm_stack

say() { echo "[dcls-mm setup] $*" >&2; }
die() { echo "[dcls-mm setup] ERROR: $*" >&2; exit 1; }
pin() { sed -n "s/^[[:space:]]*$1==\([^[:space:]#]*\).*$/\1/p" "$STACK" | head -n 1; }

[ -f "$STACK" ] || die "pinned stack file $STACK is missing (is this a dcls-mm checkout?)"

fingerprint() {
  cat "$STACK" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1
}

venv_python_works() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}

# Exit status 0: complete; 1: problems, listed one a line; other: the check itself
# crashed (e.g. a compiled package that segfaults on import), said here in one line.
check_env() {  # $1: --quiet or nothing
  local rc=0
  "$VENV/bin/python" "$ROOT/tools/env/check_env.py" --stack "$STACK" "$@" || rc=$?
  if [ "$rc" -gt 1 ]; then
    local how="exit status $rc"
    [ "$rc" -gt 128 ] && how="killed by signal SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)))"
    echo "  - the check crashed ($how) while importing the stack: a compiled package in $VENV is corrupt or was built for another system" >&2
  fi
  return "$rc"
}
RECREATE="rm -rf $VENV && bash tools/env/setup.sh"

# dcls-mm's optional C++ kernels: built when missing for the current sources (cached
# under ~/.cache/dcls-mm/ext, ~15 s); without a compiler dcls_mm runs its PyTorch fallback.
build_extension() {
  "$VENV/bin/python" "$ROOT/tools/env/build_extension.py" "$@" || true
}

if [ "${1:-}" = "--check" ]; then
  if [ ! -e "$VENV" ]; then
    die "no dcls-mm environment at $VENV. Create it with: bash tools/env/setup.sh (or bash tools/test.sh)"
  fi
  venv_python_works || die "the environment at $VENV is broken: $VENV/bin/python does not run. Delete it or run: bash tools/env/setup.sh"
  rc=0; check_env || rc=$?
  [ "$rc" -le 1 ] || die "the environment at $VENV is broken: its check crashed. Recreate it: $RECREATE"
  [ "$rc" -eq 0 ] || die "the environment at $VENV is incomplete (see above). Repair it with: bash tools/env/setup.sh (a package that is installed but fails to import is not repaired in place; recreate the environment: $RECREATE)"
  build_extension --status
  say "environment at $VENV is complete"
  exit 0
fi

# --- reuse an up-to-date environment -------------------------------------------------
want=$(fingerprint)
if venv_python_works && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  rc=0; problems=$(check_env --quiet 2>&1) || rc=$?
  if [ "$rc" -eq 0 ]; then
    build_extension
    say "environment up to date: $VENV"
    exit 0
  fi
  say "the environment at $VENV failed its check; repairing it:"
  echo "$problems" | sed 's/^/    /' >&2
  if [ "$rc" -gt 1 ]; then  # a crashing package is not repaired by pip: start afresh
    say "recreating $VENV"
    rm -rf "$VENV"
  fi
fi

# --- (re)create the virtual environment ----------------------------------------------
if [ -e "$VENV" ] && ! venv_python_works; then
  say "found a broken virtual environment at $VENV (its python does not run); recreating it"
  rm -rf "$VENV"
fi
if [ ! -e "$VENV" ]; then
  say "creating virtual environment $VENV with $PY_BASE"
  "$PY_BASE" -m venv "$VENV" || die "could not create a virtual environment with '$PY_BASE -m venv'"
fi
rm -f "$STAMP"

# pip without the machine's configuration (its find-links offers the "+cpu" torch),
# keeping its certificate bundle if one is configured.
cert=${PIP_CERT:-$("$PY_BASE" -m pip config get global.cert 2>/dev/null || true)}
pip_() {
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    ${cert:+PIP_CERT="$cert"} PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$VENV/bin/python" -m pip "$@"
}

say "[1/5] build tools"
pip_ install -q -c "$STACK" setuptools wheel ninja numpy opencv-python-headless

say "[2/5] torch $(pin torch) + torchvision $(pin torchvision) (PyPI pair)"
pip_ install -q -c "$STACK" torch torchvision

say "[3/5] mmcv $(pin mmcv) with compiled ops"
mmcv_v=$(pin mmcv); torch_v=$(pin torch)
# CPU-only and CUDA builds of mmcv differ: never reuse one for the other.
flavor=$("$VENV/bin/python" -c 'import os, torch; print("cuda" if torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1" else "cpu")')
tag="torch${torch_v}-py$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')-$flavor"
repo_cache=$ROOT/.cache/wheels/$tag
user_cache=${XDG_CACHE_HOME:-$HOME/.cache}/dcls-mm/wheels/$tag
wheel=$(ls "$repo_cache"/mmcv-"$mmcv_v"-*.whl "$user_cache"/mmcv-"$mmcv_v"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  say "no cached mmcv wheel: building mmcv $mmcv_v from source (about 9 minutes on 2 cores, once per machine)"
  mkdir -p "$repo_cache"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} pip_ wheel --no-build-isolation --no-deps \
    -c "$STACK" -w "$repo_cache" "mmcv==$mmcv_v" \
    || die "building mmcv $mmcv_v failed (see the compiler output above)"
  wheel=$(ls "$repo_cache"/mmcv-"$mmcv_v"-*.whl | head -n 1)
fi
mkdir -p "$repo_cache" "$user_cache"
[ -f "$repo_cache/$(basename "$wheel")" ] || cp "$wheel" "$repo_cache/"
[ -f "$user_cache/$(basename "$wheel")" ] || cp "$wheel" "$user_cache/" || true
pip_ install -q -c "$STACK" "$wheel"

say "[4/5] OpenMMLab stack, timm, tests and dcls-mm (editable)"
pip_ install -q -c "$STACK" -e "$ROOT[tests,mim]"
# frost textures of the corruptions; --no-deps: its stale requirements pull opencv-python
pip_ install -q --no-deps "imagecorruptions==$(pin imagecorruptions)"

say "[5/5] dcls-mm C++ kernels (optional)"
build_extension

check_env || die "the freshly installed environment failed its check (see above). If a package fails to import, recreate the environment: $RECREATE"
echo "$want" > "$STAMP"
say "environment ready: $VENV"
