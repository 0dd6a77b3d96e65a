"""``knnvq-study`` under a cluster's preemption (issue 24): SIGUSR1 (what SLURM's
``--signal`` sends before the time limit; SIGTERM takes the same path, and a training
stopped by SIGTERM directly is in tests/e2e/test_faults.py) is passed on to the
training it runs, which saves and exits; the study leaves no process behind, exits
with status 75, and the same command resumes the run; a second study into the same
``--out`` stops while the first runs."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from fairseq_run import CONFIG_DIR, console_script

UPDATES = 10


def wait_for(predicate, timeout=180, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_preemption_signal_reaches_the_runs_and_the_rerun_resumes(tiny_manifests, tmp_path):
    out = tmp_path / "study"
    command = [
        console_script("knnvq-study"),
        "--task",
        "speech",
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--configs",
        "tiny_knn_ce",
        "--seeds",
        "1",
        "--data",
        str(tiny_manifests),
        "--out",
        str(out),
        "--set",
        f"optimization.max_update={UPDATES}",
        "--set",
        "common.log_interval=1",
        "--no-compose-check",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_dir = out / "runs" / "tiny_knn_ce" / "default" / "seed1"
    log, lock = run_dir / "console.log", run_dir / "checkpoints" / "run.lock"
    study = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for(lambda: log.is_file() and '"num_updates": "2"' in log.read_text(), what="update 2 in " + str(log))
        training_pid = json.loads(lock.read_text())["pid"]

        os.kill(training_pid, signal.SIGSTOP)  # held at its update while the second study tries
        try:
            second = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=120
            )
        finally:
            os.kill(training_pid, signal.SIGCONT)
        assert second.returncode == 2
        assert f"knnvq-study: error: {out} is in use: process {study.pid} on " in second.stdout

        study.send_signal(signal.SIGUSR1)
        output, _ = study.communicate(timeout=180)
    finally:
        if study.poll() is None:
            study.kill()
    assert study.returncode == 75, output[-3000:]
    assert "SIGUSR1: passed on to 1 running training(s)" in output
    assert "knnvq-study: stopped by SIGUSR1" in output
    with pytest.raises(ProcessLookupError):
        os.kill(training_pid, 0)  # the training ended, and was waited for
    last = run_dir / "checkpoints" / "checkpoint_last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["optimizer_history"][-1]["num_updates"]
    assert 2 <= saved < UPDATES
    assert f"SIGUSR1 received: saved {last} at update {saved}; exiting with status 75" in log.read_text()
    assert not (out / "study.lock").exists() and not lock.exists()

    rerun = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"Loaded checkpoint {last} (epoch 1 @ {saved} updates)" in log.read_text()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["metrics"]["num_updates"] == UPDATES
