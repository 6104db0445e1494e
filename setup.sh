#!/usr/bin/env bash
# Build ./.venv with Python 3.12 and install this project with its test extras, pinned to the
# GPU machines' versions (.ci/constraints.txt). Used by the README and by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")"

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
echo "setup.sh: $PY ($("$PY" --version))"
rm -rf .venv
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c .ci/constraints.txt -e ".[test]"
.venv/bin/python -c "import torch, triton, jax; print('setup.sh: torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__)"
