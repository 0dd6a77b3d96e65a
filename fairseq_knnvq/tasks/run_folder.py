"""Training runs that lose nothing under faults and cannot be mixed.

The plugin's tasks (``audio_pretraining_knnvq``, ``audio_finetuning_knnvq``,
``image_autoencoding``) add :class:`GuardedRunMixin`, which hooks fairseq's training
loop (``fairseq_cli/train.py``) at three points when the task is set up:

1. **Checkpoint files.** fairseq writes the first file of a save through a ``.tmp``
   name and a rename, but *copies* it in place to ``checkpoint_last.pt`` /
   ``checkpoint_best.pt``: a kill or a full disk during that copy leaves a truncated
   file. The hook gives ``fairseq.checkpoint_utils`` a ``PathManager`` whose ``copy``
   and ``rename`` write a hidden temporary file, flush it to disk and rename it over
   the target, so every checkpoint file is either the old one or the complete new one.
2. **Before training** (``checkpoint_utils.load_checkpoint``, after the model is built,
   before any update), :func:`prepare_run_folder`:

   - checks the options that fairseq accepts but that break training
     (``optimization.lr`` > 0, the ``tri_stage`` schedule's decay phase at least one
     update);
   - takes ``<save_dir>/run.lock`` (:class:`fairseq_knnvq.folder_lock.FolderLock`):
     a second process into a folder in use stops, naming the first;
   - compares this run with the folder's run (``<save_dir>/run.json``, written at the
     first start: the config name, the overrides and the options that make the run;
     for a folder without it, the config inside ``checkpoint_last.pt``): a run of
     another config stops, naming both, the options that differ and the fix; the same
     config resumes (or, finished, skips) as before. Options that a resume may change
     (``optimization.max_update``, data paths, logging, workers) are not compared;
   - resumes from the newest readable checkpoint when ``checkpoint_last.pt`` cannot be
     read (it is kept as ``checkpoint_last.pt.unreadable``), with a warning naming both;
   - installs the preemption handlers.
3. **Preemption.** SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a
   preemption) lets the current update finish; the workers agree on it through the
   update's summed logging outputs, save ``checkpoint_last.pt`` (without validating),
   log one line and exit with :data:`PREEMPTED_EXIT_STATUS`. The same command resumes
   at the next update. A second signal of the same kind ends the process at once.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..checkpoint_safety import damage_message, load_error_message
from ..files import atomic_path, atomic_write_text
from ..folder_lock import FolderInUseError, FolderLock
from ..preflight import RunConfigError
from .renamed_fields import rename_old_model_fields

logger = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry". A job
# script requeues on it (``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``).
PREEMPTED_EXIT_STATUS = 75
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
RUN_RECORD = "run.json"
RUN_LOCK = "run.lock"
UNREADABLE_SUFFIX = ".unreadable"
# The logging-output key by which the workers tell each other of a signal (summed).
_PREEMPT_KEY = "_knnvq_preempt"
_INSTALLED = "_fairseq_knnvq_guarded_run"

# Options a resumed run may change without becoming another run: paths, lengths,
# logging, and fields that copy such options (fairseq's ``II(...)`` interpolations).
_NOT_IDENTITY = {
    "task.data",
    "task.max_update",
    "task.seed",
    "task.tpu",
    "task.train_subset",
    "model.w2v_args",
    "model.data",
    "model.ddp_backend",
    "criterion.log_keys",
    "criterion.knn_log_interval",
    "criterion.grid_dir",
    "criterion.grid_images",
}
_FIX_MIXED = (
    "Give this run its own folder (another checkpoint.save_dir, or hydra.run.dir when "
    "save_dir is under it), or move the old run's files out of {folder} to start over there"
)


class RunFolderError(RunConfigError):
    """A run that must not start in its folder, or with its options; the message names
    the folder or option and the fix (printed without a traceback)."""


class _Preemption:
    """Process-wide preemption state (one training loop per process)."""

    signal_name: Optional[str] = None  # the first signal received
    agreed = False  # every worker knows (from the summed logging outputs)
    previous: Dict[int, Any] = {}
    lock: Optional[FolderLock] = None  # the save_dir's lock, held by rank 0


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _Preemption.signal_name is None:
        _Preemption.signal_name = name
        # A second signal of this kind takes the default action: the process ends now.
        signal.signal(signum, signal.SIG_DFL)


def install_preemption_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        logger.warning("not in the main thread: SIGTERM/SIGUSR1 end the run without a final save")
        return
    for name in PREEMPTION_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            _Preemption.previous[number] = signal.signal(number, _on_signal)


# --------------------------------------------------------------------------- checks


def check_training_options(cfg) -> None:
    """Raises :class:`RunFolderError` for options fairseq accepts but that break
    training: a learning rate <= 0 (trains away from the minimum), a ``tri_stage``
    schedule whose decay phase has no update (``ZeroDivisionError`` in fairseq)."""
    lrs = list(cfg.optimization.lr)
    if not lrs or any(not (float(lr) > 0) for lr in lrs):
        raise RunFolderError(f"optimization.lr must be > 0, got {lrs}; e.g. optimization.lr=[0.0005]")
    scheduler = cfg.get("lr_scheduler") or {}
    if scheduler.get("_name") == "tri_stage":
        # fairseq divides by the decay phase's length (ZeroDivisionError for 0 updates);
        # a warmup or hold phase of 0 updates is fine (it starts at the peak / skips it).
        ratios = scheduler.get("phase_ratio")
        max_update = cfg.optimization.max_update
        if ratios is not None and len(ratios) == 3:
            phases = [int(max_update * ratio) for ratio in ratios]
            if phases[2] < 1:
                fewest = next(n for n in range(1, 10**7) if int(n * ratios[2]) >= 1)
                raise RunFolderError(
                    f"lr_scheduler.phase_ratio {list(ratios)} with optimization.max_update={max_update} gives "
                    f"phases of {phases} updates; the tri_stage schedule needs at least one update in its decay "
                    f"phase: use optimization.max_update={fewest} or more (or a larger last phase ratio)"
                )
        elif ratios is None and (scheduler.get("decay_steps") or 0) < 1:
            raise RunFolderError(
                f"lr_scheduler.decay_steps is {scheduler.get('decay_steps')}; the tri_stage schedule needs at "
                f"least one update in its decay phase: e.g. lr_scheduler.decay_steps=1"
            )


# --------------------------------------------------------------------------- identity


def _flat(prefix: str, node: Any) -> Dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        return {}
    return {f"{prefix}.{key}": value for key, value in node.items()}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def run_identity(cfg: Any) -> Dict[str, Any]:
    """The options that make a run what it is: the task's name and options (not its
    data folder), the model and the criterion, flattened to ``section.field``."""
    from omegaconf import DictConfig, OmegaConf

    model = cfg.get("model")
    if isinstance(model, DictConfig):
        model = OmegaConf.to_container(model, resolve=True)
    if isinstance(model, dict):
        model = dict(model)
        rename_old_model_fields(model)  # a checkpoint of 0.1.0 is the same variant
    identity = {**_flat("task", cfg.get("task")), **_flat("model", model), **_flat("criterion", cfg.get("criterion"))}
    return _jsonable({key: value for key, value in identity.items() if key not in _NOT_IDENTITY})


def identity_differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``field: <recorded> there, <current> here`` for the fields both hold with different
    values (fields only one holds come from another plugin version: not compared)."""
    return [
        f"{key}: {recorded[key]!r} there, {current[key]!r} here"
        for key in sorted(recorded.keys() & current.keys())
        if recorded[key] != current[key]
    ]


def _hydra_origin() -> Dict[str, Any]:
    """The hydra config name and the command-line overrides of this run ({} outside hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hydra = HydraConfig.get()
        return {"config_name": hydra.job.config_name, "overrides": list(hydra.overrides.task)}
    except Exception:  # another hydra version: the record works without it
        return {}


def _describe(record: Dict[str, Any]) -> str:
    name = record.get("config_name") or "a run without a config name (not started by hydra)"
    overrides = [o for o in record.get("overrides", []) if o.split("=", 1)[0].lstrip("+~") not in _PATH_OVERRIDES]
    return f"{name}" + (f" ({' '.join(overrides)})" if overrides else "")


_PATH_OVERRIDES = {"task.data", "common.user_dir", "hydra.run.dir", "checkpoint.save_dir"}


def _read_checkpoint_cfg(path: Path) -> Optional[Dict[str, Any]]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    cfg = state.get("cfg") if isinstance(state, dict) else None
    return cfg if isinstance(cfg, dict) else None


def check_same_run(folder: Path, cfg: Any, last: Optional[Path]) -> Dict[str, Any]:
    """Raises :class:`RunFolderError` when ``folder`` holds checkpoints of a run of other
    options than ``cfg``; returns the record of this run (to write when the folder has
    none, or no checkpoints: its ``run.json`` is then of a run that saved nothing, or
    whose checkpoints were moved away)."""
    current = {**_hydra_origin(), "identity": run_identity(cfg)}
    if not checkpoint_candidates(folder, exclude=None):
        return current
    record_path = folder / RUN_RECORD
    recorded: Optional[Dict[str, Any]] = None
    source = str(record_path)
    if record_path.is_file():
        try:
            recorded = json.loads(record_path.read_text(encoding="utf-8"))
        except ValueError:
            recorded = None
    if recorded is None and last is not None:
        saved = _read_checkpoint_cfg(last)
        if saved is not None:
            recorded, source = {"identity": run_identity(saved)}, str(last)
    if recorded is not None:
        differences = identity_differences(recorded.get("identity", {}), current["identity"])
        if differences:
            more = f" (and {len(differences) - 5} more)" if len(differences) > 5 else ""
            raise RunFolderError(
                f"{folder} holds checkpoints of another run: {_describe(recorded)} (from {source}); this run "
                f"is {_describe(current)}. They differ in {'; '.join(differences[:5])}{more}. "
                + _FIX_MIXED.format(folder=folder)
            )
    return current


# --------------------------------------------------------------------------- files


def _fsync(path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_copy(source, target) -> None:
    """Copies ``source`` to ``target`` through a hidden temporary file in ``target``'s
    folder, flushed to disk, then renamed: ``target`` is never left half-written."""
    with atomic_path(target) as partial:
        shutil.copyfile(source, partial)
        _fsync(partial)


def checkpoint_candidates(folder: Path, exclude: Optional[Path]) -> List[Path]:
    """The folder's checkpoint files other than ``exclude``, newest first."""
    files = [p for p in folder.glob("checkpoint*.pt") if p.is_file() and p != exclude]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def remove_leftovers(folder: Path) -> None:
    """Removes the temporary files of saves that were killed (``checkpoint*.pt.tmp`` of
    fairseq, ``.checkpoint*.partial`` of :func:`atomic_copy`); called with the folder's
    lock held, so no running save owns them."""
    for leftover in [*folder.glob("checkpoint*.pt.tmp"), *folder.glob(".checkpoint*.partial")]:
        logger.info(f"removing {leftover}, left by an interrupted save")
        leftover.unlink(missing_ok=True)


def recover_unreadable_last(last: Path) -> None:
    """When ``last`` (``checkpoint_last.pt``) cannot be read or fails its CRC check, keeps it as
    ``checkpoint_last.pt.unreadable`` and puts a copy of the newest readable checkpoint
    of its folder in its place, with a warning naming both; :class:`RunFolderError`
    when there is none."""
    problem = load_error_message(str(last)) or damage_message(str(last))
    if problem is None:
        return
    for candidate in checkpoint_candidates(last.parent, last):
        if load_error_message(str(candidate)) is None and damage_message(str(candidate)) is None:
            kept = last.with_name(last.name + UNREADABLE_SUFFIX)
            atomic_copy(last, kept)
            atomic_copy(candidate, last)  # checkpoint_last.pt exists all along
            logger.warning(
                f"{problem}; resuming from {candidate}, the newest readable checkpoint of the folder "
                f"(copied to {last.name}; the unreadable file is kept as {kept.name})"
            )
            return
    raise RunFolderError(
        f"{problem}, and no other checkpoint in {last.parent} can be read. Move {last} away to start "
        f"this run from the beginning"
    )


def _atomic_path_manager():
    """fairseq's ``PathManager`` whose ``copy`` and ``rename`` of local files cannot
    leave a truncated target."""
    from fairseq.file_io import PathManager

    class AtomicPathManager(PathManager):
        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if "://" in src_path or "://" in dst_path:
                return PathManager.copy(src_path, dst_path, overwrite)
            if not overwrite and os.path.exists(dst_path):
                return False
            atomic_copy(src_path, dst_path)
            return True

        @staticmethod
        def rename(src: str, dst: str):
            if "://" in src or "://" in dst:
                return PathManager.rename(src, dst)
            _fsync(src)  # the data is on disk before the name points at it
            os.replace(src, dst)

    return AtomicPathManager


# --------------------------------------------------------------------------- hooks


def _is_rank_zero(cfg) -> bool:
    return cfg.distributed_training.distributed_rank == 0


def prepare_run_folder(cfg, trainer) -> None:
    """Everything between the built model and the first update; see the module's doc."""
    check_training_options(cfg)
    folder = Path(cfg.checkpoint.save_dir).absolute()
    suffix = getattr(trainer, "checkpoint_suffix", "") or ""
    last = folder / f"checkpoint_last{suffix}.pt"
    if _is_rank_zero(cfg) and not cfg.checkpoint.no_save:
        _Preemption.lock = FolderLock(
            folder,
            RUN_LOCK,
            "training into this checkpoint.save_dir",
            "Wait for it to end, or give this run another checkpoint.save_dir",
        )
        try:
            _Preemption.lock.acquire()
        except FolderInUseError as error:
            raise RunFolderError(str(error)) from None
        remove_leftovers(folder)
        resuming = cfg.checkpoint.restore_file == "checkpoint_last.pt" and last.is_file()
        record = check_same_run(folder, cfg, last if resuming else None)
        if resuming:
            recover_unreadable_last(last)
        if not (folder / RUN_RECORD).is_file() or not checkpoint_candidates(folder, exclude=None):
            record["created"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            atomic_write_text(folder / RUN_RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the other workers look for checkpoint_last.pt after rank 0 mended it
    install_preemption_handlers()


def _saved_by_fairseq(cfg, trainer, epoch_itr, end_of_epoch: bool) -> bool:
    """Whether fairseq's ``validate_and_save`` has just saved this update (its own rule)."""
    updates = trainer.get_num_updates()
    every = cfg.checkpoint.save_interval_updates
    return (end_of_epoch and epoch_itr.epoch % cfg.checkpoint.save_interval == 0) or (
        every > 0 and updates > 0 and updates % every == 0 and updates >= cfg.dataset.validate_after_updates
    )


def install() -> None:
    """Installs the hooks (once per process; later calls do nothing). The preemption hook
    goes into ``fairseq_cli.train`` only when a training entry point has imported it
    (``fairseq-hydra-train``, ``fairseq-train`` and ``knnvq-train`` do so before they set
    up the task); tools that only load a checkpoint do not import it."""
    from fairseq import checkpoint_utils

    if not getattr(checkpoint_utils, _INSTALLED, False):
        setattr(checkpoint_utils, _INSTALLED, True)
        checkpoint_utils.PathManager = _atomic_path_manager()
        original_load = checkpoint_utils.load_checkpoint

        @functools.wraps(original_load)
        def load_checkpoint(cfg, trainer, **kwargs):
            if isinstance(trainer.task, GuardedRunMixin):
                prepare_run_folder(trainer.cfg, trainer)
            return original_load(cfg, trainer, **kwargs)

        checkpoint_utils.load_checkpoint = load_checkpoint

    fairseq_train = sys.modules.get("fairseq_cli.train")
    if fairseq_train is None or getattr(fairseq_train, _INSTALLED, False):
        return
    setattr(fairseq_train, _INSTALLED, True)
    original_validate_and_save = fairseq_train.validate_and_save

    @functools.wraps(original_validate_and_save)
    def validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
        valid_losses, should_stop = original_validate_and_save(
            cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch
        )
        if not _Preemption.agreed or should_stop:
            return valid_losses, should_stop
        updates = trainer.get_num_updates()
        if not _saved_by_fairseq(cfg, trainer, epoch_itr, end_of_epoch):
            checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, None)
        saved = (
            "nothing saved (checkpoint.no_save)"
            if cfg.checkpoint.no_save
            else (f"saved {os.path.join(cfg.checkpoint.save_dir, 'checkpoint_last.pt')} at update {updates}")
        )
        logger.warning(
            f"{_Preemption.signal_name or 'a signal'} received: {saved}; exiting with status "
            f"{PREEMPTED_EXIT_STATUS} (requeue the job; the same command resumes there)"
        )
        if _Preemption.lock is not None:
            _Preemption.lock.release()
        sys.exit(PREEMPTED_EXIT_STATUS)

    fairseq_train.validate_and_save = validate_and_save


class GuardedRunMixin:
    """Goes before the fairseq task class in the bases: installs the hooks when the task
    is set up and carries a preemption signal through the update's logging outputs."""

    def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        install()

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )
        # Always present: fairseq sums logging outputs across workers key by key.
        logging_output[_PREEMPT_KEY] = 1 if _Preemption.signal_name else 0
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        if sum(log.pop(_PREEMPT_KEY, 0) for log in logging_outputs) > 0:
            _Preemption.agreed = True
        super().reduce_metrics(logging_outputs, criterion)
