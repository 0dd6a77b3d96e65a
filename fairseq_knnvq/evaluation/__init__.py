"""Evaluation of trained models outside fairseq's training loop.

- :mod:`.image_metrics`: PSNR, SSIM and the Fréchet distance of Inception features
  (fairseq-free);
- :mod:`.image`: a ``vq_image_autoencoder`` checkpoint on an image folder
  (``knnvq-eval-image``);
- :mod:`.speech`: greedy CTC decoding and word / character error rates
  (``knnvq-infer``).
"""
