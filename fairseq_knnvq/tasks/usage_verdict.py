"""The code-usage verdict of every validation pass, in words, in the run's own log.

fairseq calls ``task.post_validate(model, stats, agg)`` after each validation subset
with the subset's pooled metrics; the plugin's pretraining and image tasks log one line
there, e.g. ``code usage on the validation subset (update 300): partial use: 561 of 640
codes (expected 627 under uniform use)`` (:func:`fairseq_knnvq.verdict.verdict`), so a
collapse shows in a user's own run, not only in the demo and the study.
"""

import logging

from ..verdict import verdict

logger = logging.getLogger(__name__)


class LogUsageVerdictMixin:
    """Goes before the fairseq task class in the bases."""

    def post_validate(self, model, stats, agg) -> None:
        parent = getattr(super(), "post_validate", None)
        if parent is not None:
            parent(model, stats, agg)
        if "code_usage" not in stats:
            return
        keys = ("code_usage", "used_codes", "used_codes_ceiling", "tightness_max_prob")
        words = verdict({key: float(stats[key]) for key in keys if key in stats})
        where = f" (update {stats['num_updates']})" if "num_updates" in stats else ""
        logger.info(f"code usage on the validation subset{where}: {words}")
