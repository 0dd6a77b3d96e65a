"""SLURM end to end on a reachable SLURM (in CI the one-node local SLURM of
scripts/local_slurm.sh, CPUs only): stock ``fairseq-hydra-train -m`` with the shipped
run configs (``+run_config=slurm_1``, ``slurm_finetune_1``) submits the jobs through
hydra's submitit launcher, and fairseq starts its workers from SLURM's environment
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``scontrol show hostnames``, the fixed port).

- A 2-task pretraining job (gloo, one CPU each, global KNN) logs every value of every
  update and validation that the 2-process torchrun run logs (its KNN loss included).
- Cancelled mid-run (scancel: the tasks save checkpoint_last.pt at the next update) and
  submitted again with the same command, it resumes there, logs the rest of the
  uninterrupted run's records and ends with its weights (the uninterrupted run is the
  torchrun one, shared with test_multinode_e2e.py, so that CI trains one job less);
  its checkpoint loads as the plugin's model.
- A 2-task fine-tuning job from that checkpoint trains, validates (WER) and saves.
"""

import os
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from cluster_runs import (
    SAVE_EVERY,
    UPDATES,
    VALID,
    assert_same_weights,
    computed,
    finished,
    free_port,
    model_weights,
    popen,
    pretraining_overrides,
)
from fairseq_run import CONFIG_DIR, console_script, last_record, parse_json_log

fairseq_knnvq.register_with_fairseq()

FINETUNE_UPDATES = 4


def submit_command(
    sweep: Path, group: str, config: str, run_config: str, partition: str, overrides: List[str]
) -> List[str]:
    """``fairseq-hydra-train -m`` with a shipped SLURM run config, sized for CPU tasks on
    the local SLURM: 2 tasks of 1 CPU, no GPU, a 10 minute limit. The job folder is
    ``sweep/0`` (the run configs' default folder name, made of the overrides, is longer
    than a file name may be with this many overrides)."""
    return [
        console_script("fairseq-hydra-train"),
        "-m",
        "--config-dir",
        str(CONFIG_DIR / group),
        "--config-name",
        config,
        f"hydra.searchpath=[file://{CONFIG_DIR}]",
        f"+run_config={run_config}",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        f"hydra.launcher.partition={partition}",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10",
        "optimization.update_freq=[1]",
        f"distributed_training.distributed_port={free_port()}",
        f"hydra.sweep.dir={sweep}",
        *overrides,
    ]


def task_logs(sweep: Path, task: int) -> List[Path]:
    """submitit's stdout files of one task (``sweep/submitit``), oldest job first."""
    return sorted(sweep.glob(f"submitit/*_{task}_log.out"), key=lambda p: int(p.name.split("_")[0]))


def job_ids(sweep: Path) -> List[str]:
    return sorted({p.name.split("_")[0] for p in sweep.glob("submitit/*_submitted.pkl")}, key=int)


def sacct_state(job: str) -> str:
    return subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], stdout=subprocess.PIPE, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def pretraining_job(slurm, slurm_partition, prepared_data, tmp_path_factory):
    """The 2-task pretraining job, cancelled (scancel) once its first periodic checkpoint
    is on disk, then the same command submitted again. Returns the sweep folder, the
    parsed logs of task 0 of both jobs, the update the first one stopped at and the
    final checkpoint_last.pt."""
    from fairseq import checkpoint_utils

    root = tmp_path_factory.mktemp("slurm_pretraining")
    sweep = root / "sweep"
    command = submit_command(
        sweep, "pretraining", "tiny_knn_ce", "slurm_1", slurm_partition, pretraining_overrides(prepared_data)
    )
    first = popen(command, root)
    checkpoints = sweep / "0" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / f"checkpoint_1_{SAVE_EVERY}.pt").is_file():
        assert first.poll() is None, f"the job ended before it was cancelled:\n{first.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    (job,) = job_ids(sweep)
    subprocess.run(["scancel", job], check=True)
    # hydra's launcher learns of the cancel only at submitit's next sacct poll (up to a
    # minute): the test stops waiting for it once SLURM has ended the job.
    while (
        not sacct_state(job).startswith("CANCELLED")
        or subprocess.run(["squeue", "-h", "-j", job], stdout=subprocess.PIPE, text=True).stdout.strip()
    ):
        assert time.monotonic() < deadline, f"job {job} still {sacct_state(job)}"
        time.sleep(0.5)
    first.terminate()
    first.communicate(timeout=60)
    stopped_at = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoints / "checkpoint_last.pt"))["optimizer_history"][
        -1
    ]["num_updates"]

    finished(popen(command, root), "the same command submitted again")
    logs = task_logs(sweep, 0)
    assert len(logs) == 2, logs
    return sweep, [parse_json_log(log.read_text()) for log in logs], stopped_at, checkpoints / "checkpoint_last.pt"


@pytest.mark.slow
def test_two_task_job_starts_from_slurm_and_trains_as_torchrun(pretraining_job, one_node_run):
    sweep, (before, _), stopped_at, _ = pretraining_job
    # fairseq took rank and rendezvous from SLURM (its _infer_slurm_init): tcp://<first
    # host of scontrol show hostnames>:<distributed_port>, rank = SLURM_PROCID
    assert "Rank 1, device_id: 0" in task_logs(sweep, 1)[0].read_text()
    assert "distributed init (rank 0): tcp://" in task_logs(sweep, 0)[0].read_text()

    # every value logged before the cancel, the global KNN loss among them, equals the
    # 2-process torchrun run's (the rest: the next test)
    reference, _ = one_node_run
    train = computed(before, "train_inner")
    assert [r["num_updates"] for r in train] == list(range(1, stopped_at + 1))
    assert all(r["knn_loss"] > 0.1 for r in train)
    assert train == computed(reference, "train_inner")[:stopped_at]
    assert computed(before, VALID) == computed(reference, VALID)[: stopped_at // SAVE_EVERY] != []


@pytest.mark.slow
def test_cancelled_job_submitted_again_resumes_and_ends_with_the_uninterrupted_weights(pretraining_job, one_node_run):
    sweep, (_, after), stopped_at, checkpoint = pretraining_job
    (job, _) = job_ids(sweep)
    assert sacct_state(job).startswith("CANCELLED")
    assert SAVE_EVERY <= stopped_at < UPDATES  # cancelled mid-run; SIGTERM saved checkpoint_last.pt
    resumed_log = task_logs(sweep, 0)[1].read_text()
    assert f"(epoch 1 @ {stopped_at} updates)" in resumed_log  # fairseq's "Loaded checkpoint ..."

    # the uninterrupted run: the 2-process torchrun run, which the SLURM job matches
    # record for record up to the cancel (test above)
    reference, reference_checkpoint = one_node_run
    assert [r["num_updates"] for r in computed(after, "train_inner")] == list(range(stopped_at + 1, UPDATES + 1))
    assert computed(after, "train_inner") == computed(reference, "train_inner")[stopped_at:]
    assert_same_weights(checkpoint, reference_checkpoint)

    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    assert type(models[0]).__name__ == "Wav2Vec2KnnVqModel"
    assert cfg.model.knn_global is True and cfg.distributed_training.distributed_world_size == 2
    assert checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))["optimizer_history"][-1]["num_updates"] == UPDATES
    assert models[0].state_dict().keys() == model_weights(checkpoint).keys()


@pytest.mark.slow
def test_finetuning_job_from_the_slurm_checkpoint(pretraining_job, slurm_partition, prepared_data, tmp_path):
    _, _, _, pretrained = pretraining_job
    sweep = tmp_path / "sweep"
    command = submit_command(
        sweep,
        "finetuning",
        "tiny",
        "slurm_finetune_1",
        slurm_partition,
        [
            f"task.data={prepared_data}",
            f"model.w2v_path={pretrained}",
            f"optimization.max_update={FINETUNE_UPDATES}",
            "common.log_interval=1",
            "distributed_training.distributed_world_size=2",
            "distributed_training.distributed_backend=gloo",
        ],
    )
    finished(popen(command, tmp_path), "fairseq-hydra-train -m +run_config=slurm_finetune_1")
    (log,) = task_logs(sweep, 0)
    records = parse_json_log(log.read_text())
    assert [r["num_updates"] for r in computed(records, "train_inner")] == list(range(1, FINETUNE_UPDATES + 1))
    valid = last_record(records, "valid")
    assert valid["valid_num_updates"] == FINETUNE_UPDATES and 0 <= valid["valid_wer"] <= 100 and "valid_uer" in valid

    from fairseq import checkpoint_utils

    checkpoint = sweep / "0" / "checkpoints" / "checkpoint_last.pt"
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    assert cfg.model._name == "wav2vec_ctc" and cfg.model.w2v_path == str(pretrained)
    assert cfg.distributed_training.distributed_world_size == 2
    assert (
        checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))["optimizer_history"][-1]["num_updates"]
        == FINETUNE_UPDATES
    )


@pytest.mark.parametrize("local_id, cuda, expected", [("1", False, "0"), ("0", False, "0"), ("1", True, "1")])
def test_cpu_tasks_keep_fairseq_off_cuda(local_id, cuda, expected, monkeypatch):
    """Without CUDA the run configs' callback makes every task's SLURM_LOCALID 0 (fairseq
    would call torch.cuda.set_device with it); with CUDA it leaves SLURM's value."""
    import torch

    from fairseq_knnvq.hydra_callbacks import SlurmTaskOnCpu

    monkeypatch.setenv("SLURM_LOCALID", local_id)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    SlurmTaskOnCpu().on_job_start(config=None)
    assert os.environ["SLURM_LOCALID"] == expected
