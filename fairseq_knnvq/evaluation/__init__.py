"""Evaluation of trained models outside fairseq's training loop.

- :mod:`.image_metrics`: PSNR, SSIM and the Fréchet distance of Inception features
  (fairseq-free);
- :mod:`.image`: a ``vq_image_autoencoder`` checkpoint on an image folder
  (``knnvq-eval-image``);
- :mod:`.speech`: CTC decoding that does not depend on the batch, greedy decoding and
  word / character error rates (``knnvq-infer``);
- :mod:`.beam_search`: CTC beam search with a KenLM n-gram LM (flashlight-text,
  ``knnvq-infer --lm``);
- :mod:`.ngram`: an n-gram LM from transcripts as an ARPA file (``knnvq-ngram-lm``);
- :mod:`.wer_table`: WER tables in the wav2vec 2.0 paper's layout (``knnvq-wer-table``).
"""
