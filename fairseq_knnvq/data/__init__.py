"""fairseq datasets the plugin's tasks read during training.

- :mod:`.audio`: wraps fairseq's raw-audio datasets, replacing an unreadable clip by the
  next readable one (seeded crops);
- :mod:`.image_folder`: an ImageNet-style image folder (or file list) as a fairseq dataset;
- :mod:`.unreadable`: the warning and count of unreadable files, shared by both.

Offline preparation (manifests, labels, dictionaries, generated images) is in
:mod:`fairseq_knnvq.preparation`.
"""
