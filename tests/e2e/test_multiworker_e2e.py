"""End to end: two fairseq workers on CPU (torchrun + gloo + legacy_ddp) pretrain the tiny
wav2vec 2.0 with global KNN (``model.knn_global=true``), whose candidate exchange runs
inside every forward pass, training and validation (where fairseq pads the shorter
worker's shard with dummy batches), without a deadlock; the checkpoint reloads.

The launch is the one documented in docs/performance.md; the values of the exchange are
checked against one process in test_global_knn.py.
"""

import math
import os
import socket
import subprocess

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq import checkpoint_utils

from fairseq_run import CONFIG_DIR, console_script, last_record, parse_json_log, records_of

fairseq_knnvq.register_with_fairseq()

UPDATES = 3
KNN_WEIGHT = 0.1  # criterion.knn_weight of tiny_knn_ce


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_worker_command(manifests, run_dir):
    return [
        console_script("torchrun"),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        console_script("fairseq-hydra-train"),
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--config-name",
        "tiny_knn_ce",
        f"task.data={manifests}",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        f"hydra.run.dir={run_dir}",
        f"optimization.max_update={UPDATES}",
        "common.log_interval=1",
        "model.knn_global=true",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        # fairseq main divides the rank by torch.cuda.device_count() when it infers the
        # torchrun set-up, which is zero on CPU; these three skip that inference.
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_rank=${oc.env:RANK}",
    ]


@pytest.mark.slow
def test_two_cpu_workers_train_with_global_knn(tiny_manifests, tmp_path):
    run_dir = tmp_path / "run"
    command = two_worker_command(tiny_manifests, run_dir)
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, f"{' '.join(command)}\n... {result.stdout[-6000:]}"
    assert "distributed init (rank 1)" in result.stdout

    records = parse_json_log(result.stdout)
    updates = records_of(records, "train_inner")
    assert [r["num_updates"] for r in updates] == [1, 2, 3]
    # The global KNN loss enters fairseq's loss with its weight (extra losses are
    # [diversity, features_pen, knn]: loss_2, in bits). Per update only: over several
    # validation batches loss_2 is a sample-size-weighted mean and knn_loss a plain one.
    for record in updates:
        assert record["loss_2"] == pytest.approx(KNN_WEIGHT * record["knn_loss"] / math.log(2), abs=2e-3)
        assert record["knn_loss"] > 20 * 2e-3  # so the comparison above is not between two zeros
        # Global KNN: each worker's search chose from the masked frames of both workers,
        # which is fairseq's ntokens summed over the workers.
        assert record["knn_rows"] == pytest.approx(record["ntokens"], abs=1e-3)
        assert record["knn_rows_per_vertex"] == pytest.approx(record["ntokens"] / (8 * 32), abs=1e-3)
    # validation ran the exchange on every batch, dummy batches included, without a deadlock
    assert last_record(records, "valid")["valid_knn_loss"] > 0

    state = checkpoint_utils.load_checkpoint_to_cpu(str(run_dir / "checkpoints" / "checkpoint_last.pt"))
    assert state["cfg"]["model"]["knn_global"] is True
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 2
    assert state["optimizer_history"][-1]["num_updates"] == UPDATES
