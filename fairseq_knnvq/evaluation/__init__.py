"""Evaluation of trained models outside fairseq's training loop: image reconstruction
metrics (:mod:`.image_metrics`). Nothing here imports fairseq."""
