"""Bad audio files: preparation refuses them; a run that meets them anyway keeps going.

Real parts: the console scripts and ``fairseq-hydra-train`` on a copy of the shipped tiny
corpus, one FLAC truncated (its header still promises every frame, so reading only the
header accepts it) and others deleted after the manifests were written."""

import shutil
import subprocess
from pathlib import Path

import pytest
import soundfile
import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq.data import AddTargetDataset
from fairseq.data.audio.raw_audio_dataset import FileAudioDataset

from fairseq_knnvq.data.audio import ReplaceUnreadableDataset, audio_path
from fairseq_run import CONFIG_DIR, TINY_CORPUS, console_script, parse_json_log, records_of, run_hydra_train

fairseq_knnvq.register_with_fairseq()

TRAIN_FILES = 20  # a short epoch: 20 files, about 3 updates of the tiny config


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def manifest_paths(tsv: Path):
    lines = tsv.read_text(encoding="utf-8").splitlines()
    return [Path(lines[0]) / line.split("\t")[0] for line in lines[1:]]


def keep_first_lines(data: Path, split: str, count: int) -> None:
    """Shortens a prepared split to its first ``count`` utterances (tsv, ltr and wrd alike)."""
    tsv = (data / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / f"{split}.tsv").write_text("".join(tsv[: count + 1]), encoding="utf-8")
    for ext in ("ltr", "wrd"):
        lines = (data / f"{split}.{ext}").read_text(encoding="utf-8").splitlines(keepends=True)
        (data / f"{split}.{ext}").write_text("".join(lines[:count]), encoding="utf-8")


def codes(line: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in line])


def prepare(corpus: Path, dest: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            console_script("knnvq-prepare-librispeech"),
            str(corpus),
            "--dest",
            str(dest),
            "--split",
            "train=train",
            "--split",
            "valid=dev",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Manifests and labels of an intact copy of the tiny corpus; afterwards one listed
    training file is truncated, another training file and a validation file deleted."""
    root = tmp_path_factory.mktemp("broken")
    corpus = root / "LibriSpeech"
    shutil.copytree(TINY_CORPUS, corpus)
    data = root / "data"
    assert prepare(corpus, data).returncode == 0
    keep_first_lines(data, "train", TRAIN_FILES)
    train, valid = manifest_paths(data / "train.tsv"), manifest_paths(data / "valid.tsv")
    truncated = truncate(train[3])
    train[11].unlink()
    valid[5].unlink()
    return dict(
        root=root, corpus=corpus, data=data, truncated=truncated, deleted_train=train[11], deleted_valid=valid[5]
    )


def test_preparation_names_the_truncated_flac_and_writes_nothing(broken):
    dest = broken["root"] / "again"
    result = prepare(broken["corpus"], dest)
    assert result.returncode != 0
    assert "knnvq-prepare-librispeech: error: split 'train': 1 of 219 audio files cannot be read" in result.stdout
    assert f"{broken['truncated']}: does not decode" in result.stdout
    assert not dest.exists()


def test_wrapper_replaces_unreadable_items_by_the_next_readable_one(broken):
    """Item by item against fairseq's own dataset on the intact files."""
    data = broken["data"]
    dataset = FileAudioDataset(str(data / "train.tsv"), sample_rate=16000, pad=True)
    wrapped = ReplaceUnreadableDataset(dataset)
    assert audio_path(wrapped.dataset, 3) == str(broken["truncated"])
    bad = {3: str(broken["truncated"]), 11: str(broken["deleted_train"])}
    for index, source_index in ((2, 2), (3, 4), (11, 12), (3, 4)):  # 3 twice: remembered, still reported
        item = wrapped[index]
        assert item["id"] == index
        assert torch.equal(item["source"], dataset[source_index]["source"])
        assert [path for path, _ in item["unreadable"]] == ([bad[index]] if index in bad else [])
    assert sorted(wrapped.failed) == [3, 11]
    # Labels move with their audio: the wrapper goes around AddTargetDataset.
    labels = (data / "train.ltr").read_text(encoding="utf-8").splitlines()
    encoded = [line.encode() for line in labels]  # what fairseq's task hands over
    with_labels = ReplaceUnreadableDataset(
        AddTargetDataset(dataset, encoded, pad=0, eos=1, batch_targets=True, process_label=codes)
    )
    assert torch.equal(with_labels[3]["label"], codes(labels[4]))
    batch = with_labels.collater([with_labels[i] for i in (2, 3, 11)])
    assert batch["id"].tolist() == [2, 3, 11]
    assert [p for p, _ in batch["unreadable"]] == [str(broken["truncated"]), str(broken["deleted_train"])]
    assert soundfile.info(str(broken["truncated"])).frames == dataset.sizes[3]  # the header still says so


def unreadable_counts(records, logger):
    key = "unreadable_files" if logger == "train_inner" else f"{logger}_unreadable_files"
    return [int(r.get(key, 0)) for r in records_of(records, logger)]


@pytest.mark.slow
def test_pretraining_and_fine_tuning_keep_going_and_count_the_bad_files(broken, tmp_path):
    """The manifests list a truncated and a deleted training file and a deleted
    validation file: both runs finish, warn once per file and log the counts."""
    data = broken["data"]
    bad_files = (broken["truncated"], broken["deleted_train"], broken["deleted_valid"])
    pretrain = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [
            f"task.data={data}",
            "optimization.max_epoch=2",
            "optimization.max_update=1000",
            "common.log_interval=1",
            "dataset.num_workers=1",  # files are read in a worker process
            f"checkpoint.save_dir={tmp_path / 'pretrain'}",
        ],
        run_dir=tmp_path / "pretrain_hydra",
        timeout=600,
    )
    records = parse_json_log(pretrain.stdout)
    # Every epoch asks for each of the 20 training items once: 2 replaced per epoch.
    assert unreadable_counts(records, "train") == [2, 2]
    assert sum(unreadable_counts(records, "train_inner")) == 4
    assert unreadable_counts(records, "valid") == [1, 1]
    for path in bad_files:
        assert pretrain.stdout.count(f"skipping unreadable audio file {path}") == 1, path
    checkpoint = tmp_path / "pretrain" / "checkpoint_last.pt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["optimizer_history"][-1]["num_updates"] == len(records_of(records, "train_inner"))

    finetune = run_hydra_train(
        CONFIG_DIR / "finetuning",
        "tiny",
        [
            f"task.data={data}",
            f"model.w2v_path={checkpoint}",
            "optimization.max_update=4",
            "dataset.valid_subset=valid",
            "dataset.max_tokens=1000000",
            "dataset.validate_interval=1",
            "common.log_interval=1",
            f"checkpoint.save_dir={tmp_path / 'finetune'}",
        ],
        run_dir=tmp_path / "finetune_hydra",
        timeout=600,
    )
    records = parse_json_log(finetune.stdout)
    # 1M frames hold all 20 files (padded): one update per epoch, 2 of its items replaced.
    assert unreadable_counts(records, "train_inner") == [2, 2, 2, 2]
    assert unreadable_counts(records, "valid") == [1, 1, 1, 1]
    for path in bad_files:
        assert finetune.stdout.count(f"skipping unreadable audio file {path}") == 1, path
    assert (tmp_path / "finetune" / "checkpoint_last.pt").is_file()


@pytest.mark.slow
def test_two_workers_sum_the_count(broken, tmp_path):
    """Two gloo workers (torchrun): fairseq sums logging outputs across workers with one
    all-reduce over the keys of each worker's output, so the count must be in every
    output (0 too); each item of the epoch is read by one worker, so the sums stay
    2 (train) and 1 (valid)."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        console_script("torchrun"),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        console_script("fairseq-hydra-train"),
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--config-name",
        "tiny_knn_ce",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        f"hydra.run.dir={tmp_path / 'ddp'}",
        f"task.data={broken['data']}",
        "optimization.max_epoch=1",
        "optimization.max_update=1000",
        "common.log_interval=1",
        f"checkpoint.save_dir={tmp_path / 'checkpoints'}",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_rank=${oc.env:RANK}",
    ]
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-6000:]
    records = parse_json_log(result.stdout)
    assert unreadable_counts(records, "train") == [2]
    assert unreadable_counts(records, "valid") == [1]
    for path in (broken["truncated"], broken["deleted_train"], broken["deleted_valid"]):
        assert f"skipping unreadable audio file {path}" in result.stdout, path
