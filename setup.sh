#!/usr/bin/env bash
# Build a virtual environment with Python 3.12 and install this project with its test extras.
#   ./setup.sh            ./.venv, pinned to the GPU machines' versions (.ci/constraints.txt).
#   ./setup.sh --latest   ./.venv-latest, without the pins: pip resolves the newest releases that
#                         pyproject.toml's ranges allow (what `pip install` gives users).
# Used by the README and by CI (.ci/run). Prints the versions it installed.
set -euo pipefail
cd "$(dirname "$0")"

case "${1:-}" in
  "")       VENV=.venv;        PINS=(-c .ci/constraints.txt) ;;
  --latest) VENV=.venv-latest; PINS=() ;;
  *) echo "usage: $0 [--latest]" >&2; exit 2 ;;
esac

find_python312() {
  if command -v pyenv >/dev/null 2>&1; then
    local v; v=$(pyenv latest 3.12 2>/dev/null || true)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python3.12" ]; then
      echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0
    fi
  fi
  if command -v python3.12 >/dev/null 2>&1 && python3.12 --version >/dev/null 2>&1; then
    command -v python3.12; return 0
  fi
  return 1
}

PY=$(find_python312) || {
  echo "setup.sh: no Python 3.12 found (tried pyenv and PATH); install one, e.g. 'pyenv install 3.12'" >&2
  exit 1
}
echo "setup.sh: $PY ($("$PY" --version)) -> $VENV"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV"/bin/python -m pip install -q --upgrade pip
"$VENV"/bin/python -m pip install -q "${PINS[@]}" -e ".[test]"
"$VENV"/bin/python - <<'PY'
from importlib.metadata import version
print("setup.sh:", ", ".join(f"{p} {version(p)}" for p in
      ("torch", "triton", "jax", "jaxlib", "transformers", "flax", "numpy")))
PY
