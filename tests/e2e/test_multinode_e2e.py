"""Multi-node without SLURM: the documented ``torchrun`` command (docs/pretraining.md)
started as 2 "nodes" of 1 process each on this host (two torchrun calls with
``--nnodes 2``, node ranks 0 and 1, one rendezvous address) trains the tiny global-KNN
run exactly as one torchrun with 2 processes on one node: every logged value of every
update and validation, and every weight of the final checkpoint, are equal."""

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq

from cluster_runs import UPDATES, VALID, assert_same_weights, computed, finished, free_port, popen, torchrun_command
from fairseq_run import parse_json_log

fairseq_knnvq.register_with_fairseq()


@pytest.mark.slow
def test_two_nodes_of_one_process_train_as_one_node_of_two(prepared_data, one_node_run, tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    nodes = [
        popen(torchrun_command(run_dir, prepared_data, nnodes=2, node_rank=rank, nproc=1, port=port), tmp_path)
        for rank in (0, 1)
    ]
    outputs = [finished(proc, f"torchrun --nnodes 2 --node_rank {rank}") for rank, proc in enumerate(nodes)]
    assert "distributed init (rank 1)" in outputs[1]
    records = parse_json_log(outputs[0])  # rank 0 logs and saves

    reference, reference_checkpoint = one_node_run
    assert [r["num_updates"] for r in computed(records, "train_inner")] == list(range(1, UPDATES + 1))
    assert computed(records, "train_inner") == computed(reference, "train_inner")
    assert computed(records, VALID) == computed(reference, VALID) != []
    assert_same_weights(run_dir / "checkpoints" / "checkpoint_last.pt", reference_checkpoint)
