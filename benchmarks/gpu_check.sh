#!/usr/bin/env bash
# The GPU paths of nas_prune in one run (under 8 minutes on one GPU), printing one table:
# bf16 + ZeRO-2 supernet training steps (nas_prune.train.train_supernet), the profiler with
# CUDA events, a 20-trial search with a latency objective measured on the GPU, export (model
# directory + ONNX) and the sub-network speed ratio on the GPU. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with a GPU, after `make venv`
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps on the CPU, tiny sizes
#
# Extra arguments go to gpu_check.py (--out DIR keeps the checkpoints, --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}  # gpu_check_device.sh sets the machine's own
if [[ ! -x $PYTHON ]]; then
    echo "gpu_check: no $PYTHON; run \`make venv\` in the repository root first" >&2
    exit 2
fi

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR="$PWD/build/torch_extensions"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ " $* " == *" --cpu-dry-run "* ]]; then
    export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
    limit=900  # the dry run shares a small CPU; the GPU run must finish in 480 s
else
    # fail fast, before loading anything heavy, when there is no GPU to check
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU found (nvidia-smi missing or failing); this check" \
             "needs one. Use --cpu-dry-run to check the CPU-side steps." >&2
        exit 1
    fi
    if ! $PYTHON -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch in .venv cannot use the GPU (torch $($PYTHON -c \
'import torch; print(torch.__version__)') is a CPU build, or the driver is too old);" \
             "install a CUDA build of torch into .venv" >&2
        exit 1
    fi
    export DS_ACCELERATOR=cuda
    limit=480
fi

timeout --signal=INT --kill-after=30 "$limit" $PYTHON benchmarks/gpu_check.py "$@"
