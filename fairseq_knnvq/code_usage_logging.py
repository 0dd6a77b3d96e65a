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

import re
from typing import Any, Dict, List, Mapping, Optional

import torch

from fairseq.logging import metrics

from .quantization import CodeUsage, codebook_stats

USAGE_KEY_PREFIX = "_code_usage_"
_USAGE_KEY = re.compile(r"^_code_usage_(\d+)x(\d+)$")

# Metric name in the logs -> key of codebook_stats.
LOGGED_STATS = {
    "code_usage": "usage",
    "used_codes": "used_entries",
    "pooled_code_perplexity": "code_perplexity",
    "pooled_prob_perplexity": "prob_perplexity",
    "tightness_max_prob": "tightness_max_prob",
    "tightness_vertex_l2": "tightness_vertex_l2",
}


def usage_logging_output(usage: CodeUsage) -> Dict[str, torch.Tensor]:
    """The logging-output entry for one batch's code usage (a detached CPU tensor)."""
    key = f"{USAGE_KEY_PREFIX}{usage.groups}x{usage.entries}"
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
