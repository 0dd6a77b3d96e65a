"""The parts of issue 24's fault handling that need no training run: the folder lock and
its stale-lock detection, the options checked before training, torch's weights-only
loading of fairseq checkpoints (old-style ones written by stock fairseq code load; a
payload is refused, named, and never runs), and checkpoint copies that a failure cannot
truncate. The same behaviour inside real runs is in tests/e2e/test_faults.py."""

import argparse
import logging
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from omegaconf import OmegaConf

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq_knnvq.checkpoint_safety import load_error_message
from fairseq_knnvq.folder_lock import FolderInUseError, FolderLock
from fairseq_knnvq.tasks import run_folder
from fairseq_knnvq.tasks.run_folder import RunFolderError, check_training_options
from old_checkpoints import RunsCode, write_old_style_checkpoint

fairseq_knnvq.register_with_fairseq()

# --- the folder lock ---------------------------------------------------------------------


def lock(folder):
    return FolderLock(folder, "run.lock", "training into this checkpoint.save_dir", "Wait for it to end")


def test_a_folder_in_use_is_refused_naming_the_process(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
sys.path[:0] = {sys.path!r}
from fairseq_knnvq.folder_lock import FolderLock
FolderLock({str(tmp_path)!r}, "run.lock", "training", "fix").acquire()
print("held", flush=True)
time.sleep(60)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError) as refused:
            lock(tmp_path).acquire()
        message = str(refused.value)
        assert message.startswith(f"{tmp_path} is in use: process {holder.pid} on ")
        assert message.endswith(f"Wait for it to end. If that process no longer runs, delete {tmp_path / 'run.lock'}")
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left the lock behind: stale, taken over.
    assert (tmp_path / "run.lock").is_file()
    taken = lock(tmp_path)
    taken.acquire()
    assert taken.holder()["pid"] == os.getpid()
    taken.release()
    assert not (tmp_path / "run.lock").exists()


def test_stale_locks_are_taken_over(tmp_path, caplog, monkeypatch):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    import socket

    def write(record):
        (tmp_path / "run.lock").write_text(__import__("json").dumps(record))

    # A process of this id no longer runs.
    write({"pid": dead_pid, "host": socket.gethostname(), "started": "earlier"})
    with caplog.at_level(logging.WARNING):
        held = lock(tmp_path)
        held.acquire()
    assert f"stale lock of process {dead_pid} on {socket.gethostname()} (started earlier)" in caplog.text
    held.release()

    # The id is alive but belongs to a process that started later (ids are reused).
    write({"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": -1})
    held = lock(tmp_path)
    held.acquire()
    held.release()

    # Another host: cannot be checked, refused; the same SLURM job (requeued): taken over.
    write({"pid": 1, "host": "another-node", "slurm_job_id": "77"})
    with pytest.raises(FolderInUseError, match="process 1 on another-node"):
        lock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    held = lock(tmp_path)
    held.acquire()
    assert held.holder()["slurm_job_id"] == "77" and held.holder()["pid"] == os.getpid()
    held.release()


# --- options checked before training -------------------------------------------------------


def training_cfg(lr=(0.0005,), scheduler=None, max_update=100):
    return OmegaConf.create(
        {
            "optimization": {"lr": list(lr), "max_update": max_update},
            "lr_scheduler": scheduler or {"_name": "polynomial_decay"},
        }
    )


def test_learning_rate_must_be_positive():
    for lr in ([-1.0], [0.0], [0.001, -0.5]):
        with pytest.raises(RunFolderError) as refused:
            check_training_options(training_cfg(lr=lr))
        assert str(refused.value) == f"optimization.lr must be > 0, got {lr}; e.g. optimization.lr=[0.0005]"
    check_training_options(training_cfg(lr=[0.0005]))


def test_tri_stage_decay_phase_needs_an_update_as_fairseq_does():
    """The message's fewest max_update is where fairseq's own scheduler starts to work."""
    from fairseq.optim.lr_scheduler.tri_stage_lr_scheduler import TriStageLRSchedule, TriStageLRScheduleConfig

    ratios = [0.1, 0.6, 0.3]  # configs/finetuning/tiny.yaml

    def fairseq_builds(max_update):
        cfg = OmegaConf.structured(TriStageLRScheduleConfig(phase_ratio=ratios, max_update=max_update, lr=[0.01]))
        from fairseq.optim.sgd import SGD

        optimizer = SGD(
            argparse.Namespace(lr=[0.01], momentum=0.0, weight_decay=0.0), [torch.nn.Parameter(torch.zeros(1))]
        )
        try:
            TriStageLRSchedule(cfg, optimizer)
        except (ZeroDivisionError, AssertionError):  # 1 update: "please specify steps or phase_ratio"
            return False
        return True

    scheduler = {"_name": "tri_stage", "phase_ratio": ratios}
    for max_update in (1, 2, 3):
        assert not fairseq_builds(max_update)
        with pytest.raises(RunFolderError) as refused:
            check_training_options(training_cfg(scheduler=scheduler, max_update=max_update))
        assert (
            "the tri_stage schedule needs at least one update in its decay phase: use "
            "optimization.max_update=4 or more" in str(refused.value)
        )
    assert fairseq_builds(4)
    check_training_options(training_cfg(scheduler=scheduler, max_update=4))


# --- weights-only loading -------------------------------------------------------------------


def test_old_style_checkpoint_of_stock_fairseq_loads_weights_only(tmp_path):
    path = tmp_path / "wav2vec_small_like.pt"
    write_old_style_checkpoint(path, tmp_path)
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:  # without the plugin's allow-list: what torch refuses in it
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == ["argparse.Namespace"]
    finally:
        torch.serialization.add_safe_globals(allowed)
    assert load_error_message(str(path)) is None
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))  # as fairseq loads it, weights only
    assert isinstance(state["args"], argparse.Namespace) and state["args"].arch == "wav2vec2"
    assert state["cfg"].model.latent_vars == 32  # fairseq's upgrade of old checkpoints


def test_a_checkpoint_with_a_payload_is_refused_and_named(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec2"}}, "model": {}, "extra": RunsCode(marker)}, evil)
    from fairseq_knnvq.checkpoints import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(evil)
    message = str(refused.value)
    assert message.startswith(f"{evil} holds posix.system, which is none of the classes a fairseq checkpoint holds")
    assert "may be malicious" in message
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in message and "weights_only=False" not in message
    assert not marker.exists()

    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 20)
    assert load_error_message(str(noise)) == f"{noise} is not a checkpoint: neither a PyTorch zip archive nor a pickle"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(evil.read_bytes()[:300])
    assert load_error_message(str(truncated)).startswith(f"{truncated} is truncated or damaged")


# --- checkpoint copies ----------------------------------------------------------------------


def test_a_failed_checkpoint_copy_leaves_the_old_file(tmp_path, monkeypatch):
    """fairseq copies checkpoint_N_M.pt to checkpoint_last.pt with checkpoint_utils'
    PathManager; with the plugin's hook a copy cut short (here: a full disk after half the
    bytes) leaves the previous checkpoint_last.pt whole and no temporary file."""
    from fairseq import checkpoint_utils

    run_folder.install()
    source, target = tmp_path / "checkpoint_1_4.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.arange(100000.0)}}, source)
    torch.save({"model": {"w": torch.zeros(3)}}, target)
    before = target.read_bytes()

    def copy_half_then_fail(src, dst):
        with open(src, "rb") as s, open(dst, "wb") as d:
            d.write(s.read()[: os.path.getsize(src) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_folder.shutil, "copyfile", copy_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_utils.PathManager.copy(str(source), str(target), overwrite=True)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_4.pt", "checkpoint_last.pt"]
    monkeypatch.undo()
    assert checkpoint_utils.PathManager.copy(str(source), str(target), overwrite=True)
    assert target.read_bytes() == source.read_bytes() and zipfile.is_zipfile(target)


# --- run identity ---------------------------------------------------------------------------


def test_identity_is_compared_only_when_the_folder_holds_checkpoints(tmp_path, monkeypatch):
    import json

    from hydra.core.hydra_config import HydraConfig

    from fairseq_knnvq.tasks.run_folder import check_same_run, run_identity

    # As a run not started by hydra, although an earlier test in this process may have left
    # hydra's global config set.
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)

    def cfg(distance, data, max_update):
        return OmegaConf.create(
            {
                "task": {"_name": "audio_pretraining_knnvq", "data": data, "max_update": max_update},
                "model": {"_name": "wav2vec2_knnvq", "knn_distance": distance},
                "criterion": {"_name": "wav2vec_knnvq", "knn_log_interval": 10},
            }
        )

    (tmp_path / "run.json").write_text(
        json.dumps({"config_name": "tiny_knn_ce", "identity": run_identity(cfg("ce", "/a", 8))})
    )
    check_same_run(tmp_path, cfg("l2", "/a", 8), None)  # no checkpoint: nothing to mix
    (tmp_path / "checkpoint_1_2.pt").write_bytes(b"")
    with pytest.raises(RunFolderError) as refused:
        check_same_run(tmp_path, cfg("l2", "/a", 8), None)
    assert str(refused.value).startswith(
        f"{tmp_path} holds checkpoints of another run: tiny_knn_ce (from "
        f"{tmp_path / 'run.json'}); this run is a run without a config name (not "
        f"started by hydra). They differ in "
        f"model.knn_distance: 'ce' there, 'l2' here. Give this run its own folder"
    )
    check_same_run(tmp_path, cfg("ce", "/moved/data", 20), None)  # a resume may move the data, train longer


def test_a_flipped_bit_is_found_although_torch_loads_the_file(tmp_path, caplog):
    """torch.load does not check the zip's CRCs: a bit flipped in the tensor data loads as
    wrong weights. Resuming checks them and takes the newest intact checkpoint."""
    from fairseq_knnvq.checkpoint_safety import damage_message
    from fairseq_knnvq.tasks.run_folder import recover_unreadable_last

    intact, last = tmp_path / "checkpoint_1_4.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.arange(1000.0)}}, intact)
    data = bytearray(intact.read_bytes())
    offset = data.index(torch.arange(1000.0).numpy().tobytes()[:64])
    data[offset + 40] ^= 0x10
    last.write_bytes(bytes(data))
    os.utime(intact, (1, 1))  # older than checkpoint_last.pt
    flipped = torch.load(last, weights_only=True)["model"]["w"]
    assert not torch.equal(flipped, torch.arange(1000.0))  # torch took it
    message = damage_message(str(last))
    assert message.startswith(f"{last} is damaged: its part ") and message.endswith(
        "fails its CRC check (a disk or copy error)"
    )
    assert damage_message(str(intact)) is None
    with caplog.at_level(logging.WARNING):
        recover_unreadable_last(last)
    assert f"{message}; resuming from {intact}, the newest readable checkpoint" in caplog.text
    assert last.read_bytes() == intact.read_bytes()
    assert (tmp_path / "checkpoint_last.pt.unreadable").read_bytes() == bytes(data)
