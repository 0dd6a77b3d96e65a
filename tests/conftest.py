"""Shared fixtures. Helpers for running fairseq's CLI live in ``fairseq_run.py``."""

import pytest

from fairseq_run import write_tiny_manifests


@pytest.fixture(scope="session")
def tiny_manifests(tmp_path_factory):
    """Folder with ``train.tsv`` / ``valid.tsv`` of the shipped tiny corpus (train / dev),
    written once per test session by ``knnvq-manifest``."""
    return write_tiny_manifests(tmp_path_factory.mktemp("tiny_manifests"))
