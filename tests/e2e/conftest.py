"""Fixtures of the cluster tests (test_slurm_e2e.py, test_multinode_e2e.py): the local
SLURM, the prepared tiny corpus, and the reference run they compare with: the tiny
pretraining run of two CPU workers started by one ``torchrun`` on one node
(helpers in tests/cluster_runs.py).

The SLURM tests need a reachable SLURM (``sinfo`` answers; ``scripts/local_slurm.sh
start`` makes one on this host and prints the ``SLURM_CONF`` to export). Without one
they skip, except in CI (``CI=true`` or ``KNNVQ_REQUIRE_SLURM=1``, which ``.ci/run``
sets), where they fail: CI must run them.
"""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from cluster_runs import finished, free_port, popen, torchrun_command
from fairseq_run import TINY_CORPUS, parse_json_log


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """train/valid (the corpus's dev/) of the shipped corpus with letter labels (pretraining and fine-tuning)."""
    from fairseq_knnvq.cli import prepare_librispeech

    dest = tmp_path_factory.mktemp("cluster_data")
    prepare_librispeech.main(
        [str(TINY_CORPUS), "--dest", str(dest), "--split", "train=train", "--split", "valid=dev", "--units", "letter"]
    )
    return dest


@pytest.fixture(scope="session")
def one_node_run(prepared_data, tmp_path_factory):
    """(parsed log, checkpoint_last.pt) of the reference: one torchrun, 2 processes."""
    root = tmp_path_factory.mktemp("one_node")
    command = torchrun_command(root / "run", prepared_data, nnodes=1, node_rank=0, nproc=2, port=free_port())
    out = finished(popen(command, root), "torchrun (1 node x 2 processes)")
    return parse_json_log(out), root / "run" / "checkpoints" / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def slurm() -> Dict[str, str]:
    """The environment of a reachable SLURM (skip, or fail in CI, without one)."""
    required = os.environ.get("CI", "").lower() == "true" or os.environ.get("KNNVQ_REQUIRE_SLURM") == "1"
    problem = None
    if shutil.which("sinfo") is None:
        problem = "no sinfo on PATH"
    else:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%P %T"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60
        )
        if result.returncode != 0 or not result.stdout.strip():
            problem = f"sinfo failed: {result.stdout.strip()[-300:]}"
    if problem:
        message = f'no SLURM reachable ({problem}); start one with: eval "$(scripts/local_slurm.sh start)"'
        if required:
            pytest.fail(message + " (CI must run the SLURM tests)")
        pytest.skip(message)
    return {"SLURM_CONF": os.environ.get("SLURM_CONF", "")} if os.environ.get("SLURM_CONF") else {}


@pytest.fixture(scope="session")
def slurm_partition(slurm) -> str:
    """The default partition (the one marked with '*' by sinfo)."""
    result = subprocess.run(["sinfo", "-h", "-o", "%P"], stdout=subprocess.PIPE, text=True, check=True)
    names = result.stdout.split()
    default = [n for n in names if n.endswith("*")]
    return (default or names)[0].rstrip("*")
