"""A finished run, started again, trains nothing and writes nothing.

fairseq's training loop (``fairseq_cli/train.py``) checks ``optimization.max_update``
only after an update: the same command run again after it finished resumes from
``checkpoint_last.pt``, trains one more update and saves it (``checkpoint_last.pt``, and
``checkpoint_best.pt`` when that update validates better). The plugin's tasks end the
process before that update instead (exit status 0, with a log line saying why).
"""

import logging
import sys

from ..models.update_count import model_num_updates

logger = logging.getLogger(__name__)

MAX_UPDATE_HELP = "read from optimization.max_update: a run resumed at that update stops before training"


class StopWhenFinishedMixin:
    """For a task whose config has ``max_update: int = II("optimization.max_update")``.
    Goes before the fairseq task class in the bases."""

    def _stop_if_finished(self, done: int) -> None:
        max_update = self.cfg.get("max_update", None) or 0
        if max_update > 0 and done >= max_update:
            logger.info(
                f"the checkpoint this run resumed from has {done} updates, optimization.max_update is "
                f"{max_update}: nothing to train, no checkpoint is written. Raise "
                f"optimization.max_update to train longer, or set a new checkpoint.save_dir for a new run"
            )
            sys.exit(0)

    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        self._stop_if_finished(model_num_updates(model) or 0)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # A model that keeps no update count: still stopped before its first update.
        self._stop_if_finished(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
