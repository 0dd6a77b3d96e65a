"""Console scripts: data preparation, inference/WER and reports."""
