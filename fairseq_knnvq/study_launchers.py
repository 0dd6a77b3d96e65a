"""Where ``knnvq-study`` runs its points: here (:func:`fairseq_knnvq.study.run_training`,
the default) or as SLURM jobs (:class:`SlurmLauncher`, ``knnvq-study --launcher slurm``).

A launcher is called as ``launcher(cmd, run_dir, progress, threads)`` and returns the
training's exit code, with the training's output in ``run_dir/console.log``; the study
does the rest (progress lines, ``result.json``, tables, skipping finished points).

:class:`SlurmLauncher` submits each point through submitit as a one-task job (its
partition, GPUs and time limit from the command line) that runs the same
``fairseq-hydra-train`` command in ``run_dir`` and writes the same ``console.log``, then
waits for the job. A job that SLURM ends (cancelled, time limit, node failure) gets a
non-zero code and the end of submitit's job log appended to ``console.log``, so the
study reports it as it reports a failed local run. submitit's own files go to
``run_dir/slurm/``. A study stopped by Ctrl-C cancels its jobs; SIGTERM / SIGUSR1 are
passed on to the jobs (``scancel --signal``), whose trainings save and stop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Sequence

LAUNCHERS = ("local", "slurm")
# submitit's folder inside a point's run folder
SLURM_FOLDER = "slurm"
# seconds between two looks at a job's state (submitit caches sacct between them)
POLL_SECONDS = 2.0
# SLURM marks a cancelled job as ended before slurmstepd has written its "CANCELLED AT" /
# "DUE TO TIME LIMIT" line into the job's stderr: wait this long for that line.
STEPD_LINE_SECONDS = 15.0
# SLURM job states in which SLURM, not the training, ended the job.
ENDED_BY_SLURM = {"CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE", "BOOT_FAIL"}


class LauncherError(Exception):
    """A launcher option the user has to fix, found before any run starts."""


def run_command_in(cmd: Sequence[str], run_dir: str, threads: int) -> int:
    """The body of a SLURM job (pickled by submitit): runs ``cmd`` in ``run_dir`` with its
    output appended to ``run_dir/console.log``; returns the exit code. SIGTERM / SIGUSR1
    that SLURM sends the job are passed on to the training."""
    import signal

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(Path(run_dir) / "console.log", "a", encoding="utf-8") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env)
        for name in ("SIGTERM", "SIGUSR1"):
            signal.signal(getattr(signal, name), lambda signum, frame: proc.send_signal(signum))
        return proc.wait()


class _JobHandle:
    """A submitted job as :class:`fairseq_knnvq.study.Progress` sees a process: ``poll``,
    ``kill`` (scancel) and ``send_signal`` (scancel --signal)."""

    def __init__(self, job) -> None:
        self.job = job

    def poll(self) -> Optional[int]:
        return 0 if self.job.done() else None

    def kill(self) -> None:
        self.job.cancel(check=False)

    def send_signal(self, signum: int) -> None:
        import signal

        subprocess.run(
            ["scancel", f"--signal={signal.Signals(signum).name[3:]}", "--full", str(self.job.job_id)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


class SlurmLauncher:
    """Runs a study's point as a SLURM job through submitit (see the module docstring).

    ``partition`` None: the cluster's default partition. ``gpus`` per run (one task on
    one node; fairseq starts one process per GPU itself). ``time_limit`` in minutes."""

    def __init__(self, partition: Optional[str], gpus: int, time_limit: int, mem_gb: Optional[int] = None) -> None:
        self.partition = partition
        self.gpus = gpus
        self.time_limit = time_limit
        self.mem_gb = mem_gb

    def check(self) -> None:
        """submitit is installed, SLURM answers, the partition exists; else LauncherError."""
        if self.gpus < 0:
            raise LauncherError("--gpus-per-run must be 0 or more")
        if self.time_limit < 1:
            raise LauncherError("--time-limit is in minutes and must be at least 1")
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise LauncherError("--launcher slurm needs submitit: pip install 'fairseq-knnvq[slurm]'") from None
        if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
            raise LauncherError(
                "--launcher slurm: no sbatch/sinfo on PATH; run knnvq-study on a SLURM login "
                "node (or use --launcher local)"
            )
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60
        )
        if result.returncode != 0:
            raise LauncherError(f"--launcher slurm: sinfo failed, SLURM does not answer: {result.stderr.strip()}")
        partitions = [p.rstrip("*") for p in result.stdout.split()]
        if self.partition is not None and self.partition not in partitions:
            raise LauncherError(f"--partition {self.partition}: no such partition (there: {', '.join(partitions)})")

    def executor(self, run_dir: Path, name: str, threads: int):
        import submitit

        executor = submitit.AutoExecutor(folder=run_dir / SLURM_FOLDER, cluster="slurm")
        parameters = dict(
            name=name,
            timeout_min=self.time_limit,
            nodes=1,
            tasks_per_node=1,
            cpus_per_task=threads,
            gpus_per_node=self.gpus,
        )
        if self.partition is not None:
            parameters["slurm_partition"] = self.partition
        if self.mem_gb is not None:
            parameters["mem_gb"] = self.mem_gb
        executor.update_parameters(**parameters)
        return executor

    def __call__(self, cmd: Sequence[str], run_dir: Path, progress, threads: int = 1) -> int:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n", encoding="utf-8")
        name = "knnvq-" + "-".join(run_dir.parts[-3:])
        job = self.executor(run_dir, name, threads).submit(run_command_in, list(cmd), str(run_dir), threads)
        with open(run_dir / "console.log", "a", encoding="utf-8") as log:
            log.write(f"knnvq-study: SLURM job {job.job_id} (submitit folder {run_dir / SLURM_FOLDER})\n")
        handle = _JobHandle(job)
        with progress.lock:
            progress.processes.add(handle)
        try:
            while not job.done():
                time.sleep(POLL_SECONDS)
        except BaseException:
            job.cancel(check=False)
            raise
        finally:
            with progress.lock:
                progress.processes.discard(handle)
        return self._exit_code(job, run_dir)

    @staticmethod
    def _exit_code(job, run_dir: Path) -> int:
        """The training's exit code; for a job that SLURM ended, 1 and the job's state and
        the end of its log appended to ``console.log``."""
        try:
            code = int(job.result())
            if code == 0:
                return 0
            # A job cancelled as the training starts can return the training's own exit
            # code (-15 after SIGTERM) before SLURM kills the job's wrapper.
            state = job.watcher.get_state(job.job_id, mode="force")
            if str(state).split(" ")[0] not in ENDED_BY_SLURM:
                return code
            reason = f": the training was stopped (exit code {code})"
        except Exception as error:  # submitit's FailedJobError / UncompletedJobError
            state = job.watcher.get_state(job.job_id, mode="force")
            reason = f" before the training returned ({type(error).__name__})"
        lines: List[str] = [f"knnvq-study: SLURM job {job.job_id} ended as {state}{reason}"]
        _wait_for_stepd_line(Path(job.paths.stderr), STEPD_LINE_SECONDS)
        for path in (job.paths.stdout, job.paths.stderr):  # stderr last: its end says why
            try:
                text = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                lines.append(f"--- no {path}: the job did not start")
                continue
            lines.append(f"--- end of {path}:")
            lines.extend(text[-15:])
        with open(run_dir / "console.log", "a", encoding="utf-8") as log:
            log.write("\n".join(lines) + "\n")
        return 1


def _wait_for_stepd_line(path: Path, seconds: float) -> None:
    """Returns once ``path`` holds a line of slurmstepd (the reason SLURM ended the job),
    or after ``seconds``: the line arrives shortly after the job's state changes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "slurmstepd" in path.read_text(encoding="utf-8", errors="replace"):
                return
        except OSError:
            pass
        time.sleep(0.25)
