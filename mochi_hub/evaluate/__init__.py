"""Evaluation of a frozen or fine-tuned backbone: the probes (kNN, linear, fast) and detection (COCO AP)."""
