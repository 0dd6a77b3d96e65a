"""Offline data preparation, before any training; nothing here imports fairseq or torch.

- :mod:`.manifest`: fairseq's audio manifests, with every file decoded and checked
  (``knnvq-manifest``);
- :mod:`.librispeech`: transcripts of a LibriSpeech-layout corpus attached to a manifest,
  letter labels, dictionaries and sentencepiece units (``knnvq-prepare-librispeech``);
- :mod:`.labels`: the label units a dictionary lacks (also checked before fine-tuning);
- :mod:`.synthetic_images`: the generated image folder of the demo and the tests.
"""
