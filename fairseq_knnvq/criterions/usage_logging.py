"""Pooled code-usage metrics in fairseq's logging.

A criterion puts :func:`usage_logging_output` of the quantizer's
:class:`~fairseq_knnvq.quantization.CodeUsage` into its logging output. The entry is a
flat tensor of sums, so fairseq's worker sync adds it up across workers (both the
``all_reduce`` path and the ``all_gather`` path), and :func:`log_code_usage` accumulates
it in a sum meter: over the log interval in training and over the whole subset in
validation. The metrics (usage, perplexities, tightness) are derived from the pooled
sums, never averaged from per-batch values.

The codebook shape is carried in the key (``_code_usage_2x320``), because fairseq sums
every value of a logging output.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Mapping, Optional

import torch

from fairseq.logging import metrics

from ..quantization import CodeUsage, codebook_stats

USAGE_KEY_PREFIX = "_code_usage_"
_USAGE_KEY = re.compile(r"^_code_usage_(\d+)x(\d+)$")

# Metric name in the logs -> key of codebook_stats (the same name, except that the
# perplexities of pooled sums are logged as pooled_*, beside fairseq's per-batch ones).
LOGGED_STATS = {
    "code_usage": "code_usage",
    "used_codes": "used_codes",
    "pooled_code_perplexity": "code_perplexity",
    "pooled_prob_perplexity": "prob_perplexity",
    "tightness_max_prob": "tightness_max_prob",
    "tightness_vertex_l2": "tightness_vertex_l2",
    "used_codes_ceiling": "used_codes_ceiling",
    "code_usage_of_ceiling": "code_usage_of_ceiling",
}

# The rows one KNN search chose from (this worker's, or every worker's with knn_global)
# and those per vertex, rows / (K * M); logged as means over the searches.
KNN_ROWS_KEYS = ("knn_rows", "knn_rows_per_vertex")

logger = logging.getLogger(__name__)


def knn_rows_logging_output(net_output: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The logging-output entries of :data:`KNN_ROWS_KEYS` (detached tensors: read back
    when fairseq syncs the logs, not in the step)."""
    return {key: net_output[key].detach().float() for key in KNN_ROWS_KEYS if key in net_output}


def few_rows_message(rows: float, k: int, entries: int, knn_global: bool, world: int) -> str:
    """The warning for a KNN search with fewer rows than the K * M neighbours it asks for."""
    per_vertex = rows / (k * entries)
    where = f"all {world} workers' batches" if knn_global and world > 1 else "this worker's batch"
    fixes = []
    if not knn_global:
        fixes.append("model.knn_global=true (each search then chooses from the rows of every worker)")
    elif world == 1:
        fixes.append("more workers (model.knn_global is on, but this run has one worker)")
    if k > 1:
        fixes.append(
            f"a smaller model.knn_k (K <= {max(1, int(rows // entries))} gives at least one row per vertex here)"
        )
    fixes.append("a larger batch (dataset.max_tokens, or more workers with knn_global)")
    return (
        f"KNN rows per vertex {per_vertex:.2f} < 1: each KNN search chooses from {rows:.0f} rows "
        f"({where}) while a group asks for K * M = {k} * {entries} = {k * entries} neighbours, so "
        "rows are shared between vertices and pulled towards several at once. In this regime our "
        "speech study found no gain over the diversity loss (docs/study.md). Fixes: "
        + "; ".join(fixes)
        + ". The logs show knn_rows and knn_rows_per_vertex in every record."
    )


class FewKnnRowsCheck:
    """Warns once, at the first training step of a model that trains on the KNN loss, when
    its search sees fewer rows than K * M (rank 0 only). The step reads one number back
    to the host, once per run."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self, model, net_output: Mapping[str, Any]) -> None:
        if self.done or not model.training or "knn_rows" not in net_output:
            return
        cfg = getattr(model, "cfg", None)
        if (
            cfg is None
            or str(getattr(cfg, "regularizer", "")) != "knn"
            or str(getattr(cfg, "quantizer", "smoothed")) == "vqvae"
        ):
            return
        self.done = True
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1 and dist.get_rank() != 0:
            return
        rows = float(net_output["knn_rows"])
        k, entries = int(cfg.knn_k), int(cfg.latent_vars)
        if rows < k * entries:
            logger.warning(few_rows_message(rows, k, entries, bool(cfg.knn_global), world))


def usage_logging_output(usage: CodeUsage) -> Dict[str, torch.Tensor]:
    """The logging-output entry for one batch's code usage (a detached CPU tensor)."""
    key = f"{USAGE_KEY_PREFIX}{usage.groups}x{usage.num_vars}"
    return {key: usage.to_flat().detach().cpu()}


def _usage_key(logging_outputs: List[Mapping[str, Any]]) -> Optional[str]:
    for log in logging_outputs:
        for key in log:
            if _USAGE_KEY.match(key):
                return key
    return None


def pooled_usage(logging_outputs: List[Mapping[str, Any]]) -> Optional[CodeUsage]:
    """Sums the usage entries of several logging outputs (None when there are none)."""
    key = _usage_key(logging_outputs)
    if key is None:
        return None
    groups, entries = (int(v) for v in _USAGE_KEY.match(key).groups())
    flat = sum(torch.as_tensor(log[key], dtype=torch.float64).cpu() for log in logging_outputs if key in log)
    return CodeUsage.from_flat(flat, groups, entries)


def _derive(meter_key: str, groups: int, entries: int, stat: str):
    def fn(meters) -> float:
        sums = meters[meter_key].sum
        if not torch.is_tensor(sums):
            return float("nan")
        value = codebook_stats(CodeUsage.from_flat(sums.double().cpu(), groups, entries)).get(stat)
        return float("nan") if value is None else round(value, 4)

    return fn


def log_code_usage(logging_outputs: List[Mapping[str, Any]]) -> None:
    """Call from a criterion's ``reduce_metrics``: accumulates the pooled sums and logs
    the derived metrics of :data:`LOGGED_STATS`."""
    key = _usage_key(logging_outputs)
    if key is None:
        return
    groups, entries = (int(v) for v in _USAGE_KEY.match(key).groups())
    usage = pooled_usage(logging_outputs)
    metrics.log_scalar_sum(key, usage.to_flat())
    for name, stat in LOGGED_STATS.items():
        metrics.log_derived(name, _derive(key, groups, entries, stat))


def is_usage_key(key: str) -> bool:
    """True for the entries that :func:`log_code_usage` handles (so criteria skip them
    when they log the other keys)."""
    return bool(_USAGE_KEY.match(key))
