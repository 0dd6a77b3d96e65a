"""Helpers of the cluster tests (tests/e2e/test_slurm_e2e.py, test_multinode_e2e.py; their
fixtures are in tests/e2e/conftest.py): the tiny two-worker global-KNN pretraining run
they all train, its torchrun command, and comparisons of logs and checkpoints."""

import os
import socket
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from fairseq_run import CONFIG_DIR, console_script

# The cluster runs all train tiny_knn_ce with global KNN for UPDATES updates on two CPU
# workers, saving (and so validating) every SAVE_EVERY updates.
UPDATES = 8
SAVE_EVERY = 2
# The validation subset (prepared_data has train and valid): the logger of its records.
VALID = "valid"
# Keys of fairseq's log records that measure time, not the computation.
TIMING_KEYS = ("wps", "ups", "wall", "train_wall", "gb_free")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretraining_overrides(data: Path) -> List[str]:
    """The tiny_knn_ce run of every cluster test: 2 workers (gloo), global KNN."""
    return [
        f"task.data={data}",
        f"dataset.valid_subset={VALID}",
        "common.log_interval=1",
        f"optimization.max_update={UPDATES}",
        f"checkpoint.save_interval_updates={SAVE_EVERY}",
        "model.knn_global=true",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
    ]


def computed(records: Sequence[Dict[str, object]], logger: str) -> List[Dict[str, object]]:
    """The records of one logger without the keys that measure time."""
    return [{k: v for k, v in r.items() if not k.endswith(TIMING_KEYS)} for r in records if r.get("_logger") == logger]


def model_weights(checkpoint: Path) -> Dict[str, torch.Tensor]:
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ between {a} and {b}, e.g. {different[:3]}"


def torchrun_command(run_dir: Path, data: Path, nnodes: int, node_rank: int, nproc: int, port: int) -> List[str]:
    """The documented torchrun launch (docs/pretraining.md) of the tiny run; fairseq on
    CPU needs the init method, no spawn and the rank given (FAIRSEQ-NOTES 4.3)."""
    import fairseq_knnvq

    return [
        console_script("torchrun"),
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        console_script("fairseq-hydra-train"),
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--config-name",
        "tiny_knn_ce",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        f"hydra.run.dir={run_dir}",
        *pretraining_overrides(data),
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_rank=${oc.env:RANK}",
    ]


def finished(proc: subprocess.Popen, what: str, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}\n... {out[-6000:]}"
    return out


def popen(command: Sequence[str], cwd: Path, env: Dict[str, str] = None) -> subprocess.Popen:
    return subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(cwd),
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
