"""nas_prune: prune fine-tuned BERT/RoBERTa encoders by multi-objective NAS on Ray."""

__version__ = "0.1.0"
