#!/usr/bin/env bash
# Create the peer environments that benchmarks/quantize_transformers.py runs in subprocesses:
# brevitas and llm-compressor, each in its own virtual environment with torch pinned to the
# project's release so that neither upgrades it.
#
#     bash benchmarks/peers_setup.sh [PEERS_DIR]      # default /work/peers or $GAUGENET_PEERS
#
# Afterwards: $PEERS_DIR/brevitas/bin/python and $PEERS_DIR/llmcompressor/bin/python.
set -euo pipefail
DIR="${1:-${GAUGENET_PEERS:-/work/peers}}"
TORCH="${TORCH_VERSION:-2.13.0}"
mkdir -p "$DIR"
echo "torch==$TORCH" > "$DIR/constraints.txt"
make_env() {  # name, packages...
  local name="$1"; shift
  if [ ! -x "$DIR/$name/bin/python" ]; then python3 -m venv "$DIR/$name"; fi
  "$DIR/$name/bin/pip" install -q --upgrade pip
  # a CPU build where pip finds one (PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL), else PyPI's
  "$DIR/$name/bin/pip" install -q "torch==$TORCH"
  "$DIR/$name/bin/pip" install -q -c "$DIR/constraints.txt" "$@"
  "$DIR/$name/bin/python" -c "import torch; print('$name: torch', torch.__version__)"
}
make_env brevitas "brevitas==0.13.4" "transformers" "safetensors"
make_env llmcompressor "llmcompressor==0.14.0.1" "safetensors"
