"""nas_prune: prune fine-tuned BERT/RoBERTa encoders by multi-objective NAS on Ray."""

import os

__version__ = "0.1.0"

# transformers (5.2x, with the `kernels` package installed) swaps layers of a loaded model for
# "hub kernels" fetched from the Hugging Face Hub at the first train()/eval(): offline on a GPU
# that is an error mid-run (seen in benchmarks/gpu_check.sh), and online it would replace the
# layers whose speed nas_prune measures with downloaded code. Off unless the user sets it.
os.environ.setdefault("USE_HUB_KERNELS", "0")
