"""``knnvq-study --launcher slurm`` on a reachable SLURM (in CI the local one of
scripts/local_slurm.sh): a 2 x 2 grid (two configs x two knn_k, one seed) runs as four
SLURM jobs through submitit, prints the same progress lines as a local study and
writes the same tables, byte for byte; a rerun skips the finished points; a job that
SLURM ends (here: cancelled) is reported with its state and the end of its log."""

import subprocess
import threading
import time

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq_knnvq.cli import study as study_cli
from fairseq_run import CONFIG_DIR

fairseq_knnvq.register_with_fairseq()

TABLES = ("runs.csv", "summary.csv", "summary.md")


def study_argv(data, out, *extra):
    return [
        "--task",
        "speech",
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--configs",
        "tiny_diversity,tiny_knn_ce",
        "--grid",
        "model.knn_k=2,8",
        "--seeds",
        "1",
        "--data",
        str(data),
        "--set",
        "optimization.max_update=3",
        "--out",
        str(out),
        "--jobs",
        "4",
        *extra,
    ]


def point_lines(output: str):
    """The progress lines of the points without their times: '[1/4] ...: started'."""
    lines = []
    for line in output.splitlines():
        if "] [" in line and ("started" in line or ": done in" in line):
            text = line.split("] ", 1)[1]
            lines.append(text.split(": done in")[0] + ": done" if ": done in" in text else text.split(" (log")[0])
    return sorted(lines)


@pytest.mark.slow
def test_slurm_study_writes_the_tables_of_a_local_study(slurm, slurm_partition, prepared_data, tmp_path, capsys):
    local_out, slurm_out = tmp_path / "local", tmp_path / "slurm"
    assert study_cli.main(study_argv(prepared_data, local_out, "--no-compose-check")) == 0
    local_lines = point_lines(capsys.readouterr().out)

    argv = study_argv(
        prepared_data,
        slurm_out,
        "--launcher",
        "slurm",
        "--partition",
        slurm_partition,
        "--time-limit",
        "10",
        "--no-compose-check",
    )
    assert study_cli.main(argv) == 0
    slurm_lines = point_lines(capsys.readouterr().out)
    assert len(local_lines) == 8 and slurm_lines == local_lines
    for name in TABLES:
        assert (slurm_out / name).read_bytes() == (local_out / name).read_bytes(), name
    # every point ran as its own SLURM job
    job_files = sorted(slurm_out.glob("runs/*/*/seed1/slurm/*_submitted.pkl"))
    assert len(job_files) == 4 and len({p.name for p in job_files}) == 4

    before = {p: p.stat().st_mtime_ns for p in slurm_out.glob("runs/*/*/*/result.json")}
    assert study_cli.main(argv) == 0
    assert "4 runs: 4 already finished, 0 to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in slurm_out.glob("runs/*/*/*/result.json")} == before


def cancel_first_study_job(stop: threading.Event) -> None:
    while not stop.is_set():
        # once it runs, so that it has a log
        jobs = subprocess.run(
            ["squeue", "-h", "-t", "R", "-o", "%i %j"], stdout=subprocess.PIPE, text=True
        ).stdout.split("\n")
        for line in jobs:
            if " knnvq-" in line:
                subprocess.run(["scancel", line.split()[0]])
                return
        time.sleep(0.2)


@pytest.mark.slow
def test_a_job_slurm_ends_is_reported_with_the_end_of_its_log(slurm, slurm_partition, prepared_data, tmp_path, capsys):
    stop = threading.Event()
    canceller = threading.Thread(target=cancel_first_study_job, args=(stop,))
    canceller.start()
    try:
        argv = [
            "--task",
            "speech",
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--configs",
            "tiny_knn_ce",
            "--seeds",
            "1",
            "--data",
            str(prepared_data),
            "--out",
            str(tmp_path / "study"),
            "--launcher",
            "slurm",
            "--partition",
            slurm_partition,
            "--no-compose-check",
        ]
        assert study_cli.main(argv) == 1
    finally:
        stop.set()
        canceller.join()
    output = capsys.readouterr()
    log = tmp_path / "study" / "runs" / "tiny_knn_ce" / "default" / "seed1" / "console.log"
    assert f"FAILED: [1/1] tiny_knn_ce - seed 1 failed (exit code 1). Last lines of {log}:" in output.out
    # SLURM kills the job's wrapper, or (cancelled as the training starts) the wrapper
    # returns the training's exit code first: either way the state is named.
    assert "ended as CANCELLED" in output.out and (
        "before the training returned" in output.out or "the training was stopped (exit code" in output.out
    )
    assert "--- end of " in output.out and "CANCELLED AT" in output.out  # slurmstepd's line in the job's log
    assert "1 run(s) failed; rerun the same command to retry them" in output.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--partition", "nosuchpartition"], "--partition nosuchpartition: no such partition (there: "),
        (["--time-limit", "0"], "--time-limit is in minutes and must be at least 1"),
    ],
)
def test_bad_slurm_options_stop_before_any_run(slurm, argv, message, prepared_data, tmp_path, capsys):
    out = tmp_path / "study"
    code = study_cli.main(
        [
            "--task",
            "speech",
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--configs",
            "tiny_knn_ce",
            "--data",
            str(prepared_data),
            "--out",
            str(out),
            "--launcher",
            "slurm",
            *argv,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_slurm_options_need_the_slurm_launcher(prepared_data, tmp_path, capsys):
    code = study_cli.main(
        [
            "--task",
            "speech",
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--configs",
            "tiny_knn_ce",
            "--data",
            str(prepared_data),
            "--out",
            str(tmp_path / "s"),
            "--partition",
            "gpu",
        ]
    )
    assert code == 2
    assert "--partition only apply with --launcher slurm" in capsys.readouterr().err
