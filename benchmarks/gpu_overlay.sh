#!/usr/bin/env bash
# Builds benchmarks/.gpu_overlay: every package benchmarks/gpu_check.py imports beyond torch, torch's
# own dependencies and numpy, for a GPU machine that has nothing else and reaches no registry. It
# travels beside the repository (64 MiB at most) and goes first on PYTHONPATH there:
#
#   bash benchmarks/gpu_overlay.sh
#   PYTHONPATH=benchmarks/.gpu_overlay:. python3 benchmarks/gpu_check.py --out $OUT/gpu-check.json
#
# Versions are pyproject.toml's pins, and for what it leaves unpinned those of the tested
# environment (scripts/setup.sh). Wheels are x86-64 Linux; compiled ones are taken for each of
# PYTHONS (default 3.11 and 3.12): their extension files are named for the interpreter, so the
# builds share one folder. Where a stable-ABI (abi3) wheel exists, that one serves every version.
# numpy does not travel: its builds for two Pythons alone take 56 MiB, and for one 40 (with the
# rest, 64 MiB is exceeded either way); any torch installation worth the name has it beside it
# (the GPU image does).
set -euo pipefail
cd "$(dirname "$0")/.."
OVERLAY=benchmarks/.gpu_overlay
LIMIT_MIB=64
read -r -a PYTHONS <<<"${PYTHONS:-3.11 3.12}"

# Pure Python: the learner (DeepSpeed, transformers and what each imports at load), and what
# rft_cluster's config, job-file and formula modules import (the learner's spec is a pydantic model).
PURE=(
  deepspeed==0.19.8 einops==0.8.2 hjson==3.1.0 py-cpuinfo==9.0.0 packaging==26.4 tqdm==4.70.1
  transformers==5.19.0 huggingface-hub==2.5.0 httpx2==2.17.0 httpcore2==2.17.0 anyio==4.16.0 h11==0.16.0
  idna==3.21 sniffio==1.3.1 truststore==0.10.5
  pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5 simpleeval==1.0.8
  typing-extensions==4.16.0  # torch's dependency too, but pydantic needs a newer one than torch does
)
ABI3=(tokenizers==0.23.3 safetensors==0.8.0 psutil==7.2.2)
# Their compiled part is an optional speed-up (pruned below): one build serves every version.
FALLBACK=(pyyaml==6.0.3 msgpack==1.2.4)
PER_PYTHON=(pydantic-core==2.50.4 regex==2026.12.2)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64; do
  PLATFORMS+=(--platform "$p")
done

pip_target() {  # pip_target TARGET ARGS...: no dependencies resolved (each is named above), no bytecode
  local target=$1
  shift
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-deps --no-compile --target "$target" "$@"
}
binaries() {  # binaries PYTHON TARGET PACKAGES...: wheels built for that interpreter
  local py=$1 target=$2
  shift 2
  pip_target "$target" --only-binary=:all: --implementation cp --python-version "$py" "${PLATFORMS[@]}" "$@"
}

rm -rf "$OVERLAY"
pip_target "$OVERLAY" "${PURE[@]}"  # DeepSpeed is published as source only: built here (without its ops)
binaries "${PYTHONS[0]}" "$OVERLAY" "${ABI3[@]}" "${FALLBACK[@]}" "${PER_PYTHON[@]}"
for py in "${PYTHONS[@]:1}"; do
  other=$(mktemp -d)
  binaries "$py" "$other" "${PER_PYTHON[@]}"
  cp -rn "$other"/. "$OVERLAY"/  # adds that version's extension files; the rest is the same
  rm -rf "$other"
done

# Pruned: what the check never loads. Tests, type stubs, console scripts, the C++ sources
# DeepSpeed compiles only for its own ops (the learner uses torch's optimizer), compiled speed-ups
# that have a pure-Python fallback, and every transformers model but `auto`, the tiny model's
# architecture (Qwen2) and those whose tokenizers or configs transformers' own modules import at
# load (seen by running the check: the GGUF and slow-tokenizer converters, the auto mappings).
find "$OVERLAY" -depth \( -name tests -o -name testing -o -name __pycache__ \) -type d -exec rm -rf {} +
find "$OVERLAY" \( -name '*.pyi' -o -name '*.c' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) -type f -delete
rm -rf "$OVERLAY"/bin "$OVERLAY"/deepspeed/ops/csrc
rm -f "$OVERLAY"/yaml/_yaml.*.so "$OVERLAY"/msgpack/_cmsgpack.*.so  # PyYAML and msgpack then run their pure-Python code
KEEP_MODELS=(auto qwen2 qwen3_5 llama gemma gpt2 t5 encoder_decoder audioflamingo3)
find "$OVERLAY"/transformers/models -mindepth 1 -maxdepth 1 -type d $(printf -- '! -name %s ' "${KEEP_MODELS[@]}") -exec rm -rf {} +

size_kib=$(du -sk "$OVERLAY" | cut -f1)
echo "[gpu-overlay] $OVERLAY: $((size_kib / 1024)) MiB (limit $LIMIT_MIB) for Python ${PYTHONS[*]}"
if ((size_kib > LIMIT_MIB * 1024)); then
  du -sk "$OVERLAY"/* | sort -n | tail -8
  echo "[gpu-overlay] over the $LIMIT_MIB MiB that may travel beside the repository" >&2
  exit 1
fi
