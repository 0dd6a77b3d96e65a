"""Faults as cluster users meet them, with real fairseq-hydra-train runs on the tiny
configs (issue 24): preemption signals, a truncated checkpoint_last.pt, a second run or
process in a folder in use, NaN audio and impossible manifest lines, options that would
train nonsense, and (fine-tuning) old-style and malicious checkpoints."""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq_knnvq.cli import infer_ctc, prepare_librispeech
from fairseq_knnvq.tasks.run_folder import PREEMPTED_EXIT_STATUS
from old_checkpoints import RunsCode, write_old_style_checkpoint
from fairseq_run import CONFIG_DIR, TINY_CORPUS, console_script, parse_json_log, records_of, run_hydra_train

fairseq_knnvq.register_with_fairseq()

UPDATES = 8


def overrides(data, save_dir, max_update=UPDATES):
    return [
        f"task.data={data}",
        "common.log_interval=1",
        f"optimization.max_update={max_update}",
        "checkpoint.save_interval_updates=3",
        f"checkpoint.save_dir={save_dir}",
    ]


def weights(checkpoint: Path):
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def num_updates(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["optimizer_history"][-1]["num_updates"]


def digests(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.pt"))}


def updates_trained(result) -> list:
    return [int(r["num_updates"]) for r in records_of(parse_json_log(result.stdout), "train_inner")]


@pytest.fixture(scope="module")
def reference(tiny_manifests, tmp_path_factory) -> Path:
    """An uninterrupted tiny_knn_ce run of UPDATES updates; its checkpoint folder."""
    root = tmp_path_factory.mktemp("reference")
    run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        overrides(tiny_manifests, root / "checkpoints"),
        run_dir=root / "hydra",
    )
    return root / "checkpoints"


class Training:
    """fairseq-hydra-train in the background; its output is collected by a thread."""

    def __init__(self, config, args, run_dir: Path):
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        command = [
            console_script("fairseq-hydra-train"),
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--config-name",
            config,
            f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
            f"hydra.run.dir={run_dir}",
            *args,
        ]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            cwd=str(run_dir.parent),
        )
        self.lines = []
        self.seen = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()

    def wait_for(self, text: str, timeout: float = 120):
        with self.seen:
            assert self.seen.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None, timeout
            ), f"no {text!r} after {timeout} s"
        assert any(text in line for line in self.lines), "".join(self.lines)[-4000:]

    def finish(self, timeout: float = 120) -> str:
        self.proc.wait(timeout)
        self.reader.join(timeout)
        return "".join(self.lines)


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM"])
def test_preemption_saves_the_current_update_and_the_rerun_matches(signal_name, reference, tiny_manifests, tmp_path):
    """Also a second process refused while the first holds the folder, and the rerun,
    which must end with the uninterrupted run's weights. SIGUSR1 takes the same path:
    tests/cli/test_study_signals.py sends it through knnvq-study to a real training."""
    save_dir = tmp_path / "checkpoints"
    args = overrides(tiny_manifests, save_dir)
    training = Training("tiny_knn_ce", args, tmp_path / "hydra")
    training.wait_for('"num_updates": "2"')
    if signal_name == "SIGTERM":
        # A second process into the folder in use stops before training, naming the first.
        training.proc.send_signal(signal.SIGSTOP)
        try:
            second = run_hydra_train(
                CONFIG_DIR / "pretraining", "tiny_knn_ce", args, run_dir=tmp_path / "second", check=False
            )
        finally:
            training.proc.send_signal(signal.SIGCONT)
        assert second.returncode == 1
        assert f"{save_dir} is in use: process {training.proc.pid} on " in second.stdout
        assert "Traceback" not in second.stdout and updates_trained(second) == []
    training.proc.send_signal(getattr(signal, signal_name))
    output = training.finish()
    assert training.proc.returncode == PREEMPTED_EXIT_STATUS, output[-4000:]
    saved = re.findall(rf"{signal_name} received: saved (\S+) at update (\d+); exiting with status 75", output)
    assert len(saved) == 1, output[-4000:]
    update = int(saved[0][1])
    last = save_dir / "checkpoint_last.pt"
    assert Path(saved[0][0]).name == "checkpoint_last.pt"
    assert 2 <= update < UPDATES
    # The update in progress was finished and saved: the last one logged.
    assert max(int(r["num_updates"]) for r in records_of(parse_json_log(output), "train_inner")) == update
    assert num_updates(last) == update
    assert not (save_dir / "run.lock").exists()

    resumed = run_hydra_train(CONFIG_DIR / "pretraining", "tiny_knn_ce", args, run_dir=tmp_path / "resume")
    assert f"Loaded checkpoint {last} (epoch 1 @ {update} updates)" in resumed.stdout
    assert updates_trained(resumed) == list(range(update + 1, UPDATES + 1))
    expected, got = weights(reference / "checkpoint_last.pt"), weights(last)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert different == []


@pytest.mark.slow
def test_truncated_checkpoint_last_resumes_from_the_newest_readable(reference, tiny_manifests, tmp_path):
    save_dir = tmp_path / "checkpoints"
    shutil.copytree(reference, save_dir)  # keeps the modification times
    last = save_dir / "checkpoint_last.pt"
    size = last.stat().st_size
    with open(last, "r+b") as file:  # what a kill during fairseq's in-place copy left
        file.truncate(size // 5)
    others = sorted((p for p in save_dir.glob("checkpoint*.pt") if p != last), key=lambda p: p.stat().st_mtime)
    newest = others[-1]
    start = num_updates(newest)
    resumed = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        overrides(tiny_manifests, save_dir, max_update=UPDATES + 2),
        run_dir=tmp_path / "hydra",
    )
    assert (
        f"{last} is truncated or damaged (its zip directory cannot be read: an interrupted copy, a full disk or "
        f"a partial download); resuming from {newest}, the newest readable checkpoint"
    ) in resumed.stdout
    assert f"(epoch 1 @ {start} updates)" in resumed.stdout
    assert updates_trained(resumed) == list(range(start + 1, UPDATES + 3))
    assert (save_dir / "checkpoint_last.pt.unreadable").stat().st_size == size // 5
    assert num_updates(last) == UPDATES + 2


@pytest.mark.slow
def test_another_config_into_a_finished_run_stops_naming_both(reference, tiny_manifests, tmp_path):
    save_dir = tmp_path / "checkpoints"
    shutil.copytree(reference, save_dir)
    before = digests(save_dir)
    result = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_l2",
        overrides(tiny_manifests, save_dir),
        run_dir=tmp_path / "hydra",
        check=False,
    )
    assert result.returncode == 1
    assert f"{save_dir} holds checkpoints of another run: tiny_knn_ce (" in result.stdout
    assert "this run is tiny_knn_l2 (" in result.stdout
    assert "model.knn_distance: 'ce' there, 'l2' here" in result.stdout
    assert "Give this run its own folder (another checkpoint.save_dir" in result.stdout
    assert "Traceback" not in result.stdout and updates_trained(result) == []
    assert digests(save_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("optimization.lr=[-1]", "optimization.lr must be > 0, got [-1.0]; e.g. optimization.lr=[0.0005]"),
        (
            "model.latent_vars=1",
            "model.latent_vars must be an integer of at least 2 (codebook entries per group), got 1; "
            "e.g. model.latent_vars=320",
        ),
    ],
)
def test_options_that_train_nonsense_stop_before_training(override, message, tiny_manifests, tmp_path):
    result = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [*overrides(tiny_manifests, tmp_path / "checkpoints"), override],
        run_dir=tmp_path / "hydra",
        check=False,
    )
    assert result.returncode == 1 and message in result.stdout
    assert "Traceback" not in result.stdout and updates_trained(result) == []
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def write_nan_wav(path: Path, frames: int = 16000) -> None:
    audio = np.random.default_rng(0).uniform(-0.1, 0.1, frames).astype(np.float32)
    audio[100] = np.nan
    soundfile.write(str(path), audio, 16000, subtype="FLOAT")


@pytest.mark.slow
def test_nan_audio_and_a_wrong_frame_count_are_skipped_and_counted(tiny_manifests, tmp_path):
    lines = (tiny_manifests / "train.tsv").read_text().splitlines()
    root, entries = Path(lines[0]), lines[1:13]
    audio = tmp_path / "audio"
    audio.mkdir()
    for entry in entries:
        shutil.copy(root / entry.split("\t")[0], audio / Path(entry.split("\t")[0]).name)
    write_nan_wav(audio / "nan.wav")
    names = [f"{Path(e.split(chr(9))[0]).name}\t{e.split(chr(9))[1]}" for e in entries]
    wrong_name, wrong_frames = names[4].split("\t")
    names[4] = f"{wrong_name}\t{int(wrong_frames) + 2000}"  # the manifest line of file 5 (line 6)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("\n".join([str(audio), "nan.wav\t16000", *names]) + "\n")
    shutil.copy(tiny_manifests / "valid.tsv", data / "valid.tsv")
    result = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [
            f"task.data={data}",
            "optimization.max_epoch=1",
            "optimization.max_update=1000",
            f"checkpoint.save_dir={tmp_path / 'checkpoints'}",
        ],
        run_dir=tmp_path / "hydra",
    )
    assert (
        result.stdout.count(f"skipping unreadable audio file {audio / 'nan.wav'} (non-finite samples (NaN or inf))")
        == 1
    )
    # nan.wav is line 2, the wrong count line 7 (line 1 is the root).
    assert (
        result.stdout.count(
            f"skipping unreadable audio file {audio / wrong_name} ({data / 'train.tsv'} line 7 says "
            f"{int(wrong_frames) + 2000} frames, the file has {wrong_frames}: rewrite the manifest"
        )
        == 1
    )
    train = records_of(parse_json_log(result.stdout), "train")
    assert [int(r["train_unreadable_files"]) for r in train] == [2]  # one epoch asks for each item once
    assert np.isfinite(float(train[0]["train_loss"]))


# --- fine-tuning: old-style and malicious checkpoints -------------------------------------


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("letters")
    prepare_librispeech.main(
        [
            str(TINY_CORPUS),
            "--dest",
            str(dest),
            "--split",
            "train=train",
            "--split",
            "valid=dev",
            "--units",
            "letter",
            "--no-progress",
        ]
    )
    return dest


def fine_tune(data, w2v_path, root: Path, max_update, check=True):
    root.mkdir(parents=True, exist_ok=True)
    return run_hydra_train(
        CONFIG_DIR / "finetuning",
        "tiny",
        [
            f"task.data={data}",
            f"model.w2v_path={w2v_path}",
            f"optimization.max_update={max_update}",
            f"checkpoint.save_dir={root / 'checkpoints'}",
        ],
        run_dir=root / f"hydra{max_update}",
        check=check,
    )


@pytest.mark.slow
def test_fine_tuning_from_an_old_style_checkpoint_needs_no_env_variable(letters, tmp_path):
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    old_style = tmp_path / "wav2vec_small_like.pt"
    write_old_style_checkpoint(old_style, letters)
    fine_tune(letters, old_style, tmp_path, max_update=4)
    last = tmp_path / "checkpoints" / "checkpoint_last.pt"
    assert num_updates(last) == 4
    # Resuming a fine-tuning run without the variable: test_finetuning_e2e's sentencepiece run.

    # The fine-tuned checkpoint decodes, but knnvq-infer refuses a dev set holding NaN audio.
    data = tmp_path / "nan_data"
    shutil.copytree(letters, data)
    lines = (letters / "valid.tsv").read_text().splitlines()
    audio = tmp_path / "dev_audio"
    shutil.copytree(lines[0], audio)
    write_nan_wav(audio / "nan.wav")
    (data / "valid.tsv").write_text("\n".join([str(audio), "nan.wav\t16000", *lines[2:]]) + "\n")
    with pytest.raises(SystemExit) as refused:
        infer_ctc.main(
            [
                str(last),
                "--data",
                str(data),
                "--subset",
                "valid",
                "--cpu",
                "--no-progress",
                "--output-dir",
                str(tmp_path / "decode"),
            ]
        )
    message = str(refused.value.code)
    assert message.startswith(
        f"knnvq-infer: error: 1 audio files of {data / 'valid.tsv'} cannot be scored:\n"
        f"  {audio / 'nan.wav'}: holds non-finite samples (NaN or inf), the first at frame 100"
    )
    assert not (tmp_path / "decode").exists()


@pytest.mark.slow
def test_fine_tuning_refuses_a_payload_and_a_schedule_without_decay(letters, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec2"}}, "model": {}, "extra": RunsCode(marker)}, evil)
    result = fine_tune(letters, evil, tmp_path / "evil_run", max_update=10, check=False)
    assert result.returncode == 1
    assert (
        f"model.w2v_path {evil} holds posix.system, which is none of the classes a fairseq checkpoint holds"
        in result.stdout
    )
    assert "may be malicious" in result.stdout
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in result.stdout and "Traceback" not in result.stdout
    assert not marker.exists()

    old_style = tmp_path / "old_style.pt"
    write_old_style_checkpoint(old_style, letters)
    result = fine_tune(letters, old_style, tmp_path / "short_run", max_update=2, check=False)
    assert result.returncode == 1
    assert (
        "lr_scheduler.phase_ratio [0.1, 0.6, 0.3] with optimization.max_update=2 gives phases of [0, 1, 0] "
        "updates; the tri_stage schedule needs at least one update in its decay phase: use "
        "optimization.max_update=4 or more"
    ) in result.stdout
    assert "Traceback" not in result.stdout and "ZeroDivisionError" not in result.stdout
