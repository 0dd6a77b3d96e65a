"""fairseq's wav2vec criterion plus the KNN term and pooled code-usage logging
(``criterion._name=wav2vec_knnvq``).

The loss is fairseq's own ``Wav2vecCriterion.forward`` (InfoNCE or BCE plus weighted
extra losses); this class only supplies the weights and adds to the logging output:

- weights ``loss_weights + [knn_weight]`` for the model's extra losses
  ``[diversity, features_pen, knn]`` (see ``models/wav2vec2_knnvq.py``), so the stock
  ``loss_weights: [0.1, 10]`` keep their meaning and the KNN term has its own weight;
- ``knn_loss`` and ``diversity_loss`` (the unweighted regularisers, also for variants
  that do not train on them)
  and the code usage sums of :mod:`fairseq_knnvq.criterions.usage_logging`, from which
  ``code_usage``, ``used_codes``, ``pooled_code_perplexity``, ``pooled_prob_perplexity``,
  ``tightness_max_prob`` and ``tightness_vertex_l2`` are derived over all workers and,
  in validation, over the whole subset.

The variants that do not train on the KNN loss (``regularizer=diversity``
or ``none``) compute it, detached, only where it is logged: in validation, and in the
training updates whose logs fairseq writes (every ``knn_log_interval`` updates, by
default ``common.log_interval``). Elsewhere the step runs no KNN search (and, with
``knn_global``, no collective for it). The logged training value is therefore the KNN
loss of the logged update, not a mean over the interval. (With fairseq's own ``wav2vec``
criterion the model computes it in every step.)

The added entries reach the host in one device-to-host copy per step
(:func:`host_logging_output`): fairseq's criterion reads each value it logs with
``.item()``, and fairseq's trainer reads every meter after every step, so values left on
the device would each cost a host sync there.

Every logging value is a sum, so the outputs are summed across workers (fairseq's fast
all-reduce path, also the one that works for CPU/gloo training). fairseq's criterion
averages keys such as ``temp`` or ``prob_perplexity`` by dividing by the number of
logging outputs, which is the wrong count once outputs are summed; here every output
carries a count, so the averages are the same for any number of workers.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion, Wav2VecCriterionConfig
from omegaconf import II

from .usage_logging import (
    USAGE_KEY_PREFIX,
    FewKnnRowsCheck,
    is_usage_key,
    knn_rows_logging_output,
    log_code_usage,
)
from ..models.wav2vec2_knnvq import EXTRA_LOSS_NAMES
from ..preflight import RunConfigError
from ..quantization import CodeUsage

# Counts the logging outputs that were summed into one, for averages (see module doc).
COUNT_KEY = "_num_logging_outputs"
# Keys fairseq's reduce_metrics sums instead of averaging.
_SUMMED_KEYS = {"loss", "ntokens", "nsentences", "sample_size", "correct", "count"}
# Logged by this criterion whether or not they are in log_keys.
_ALWAYS_LOGGED = ("knn_loss", "diversity_loss", "code_usage")


@dataclass
class Wav2VecKnnVqCriterionConfig(Wav2VecCriterionConfig):
    knn_weight: float = field(
        default=0.1,
        metadata={
            "help": "weight of the KNN-to-vertex loss (scaled by the sample size like the "
            "other extra losses); loss_weights keep fairseq's meaning: [diversity, "
            "features_pen]"
        },
    )
    knn_log_interval: int = field(
        default=II("common.log_interval"),
        metadata={
            "help": "training updates between the ones in which variants that do not train "
            "on the KNN loss (regularizer diversity, none) compute it for the logs; default "
            "common.log_interval, i.e. exactly the updates whose logs are written. "
            "Validation always computes it"
        },
    )


class _NetOutputRecorder:
    """Stands in for the model inside fairseq's criterion forward: passes every call
    through and keeps the network output, which that forward does not return."""

    def __init__(self, model):
        self._model = model
        self.net_output: Optional[Dict[str, Any]] = None

    def __call__(self, *args, **kwargs):
        self.net_output = self._model(*args, **kwargs)
        return self.net_output

    def __getattr__(self, name):
        return getattr(self._model, name)

    def get_extra_losses(self, net_output):
        losses = self._model.get_extra_losses(net_output)
        if torch.is_tensor(losses) or len(losses) != len(EXTRA_LOSS_NAMES):
            raise RunConfigError(
                "criterion wav2vec_knnvq needs a model whose extra losses are [diversity, "
                "features_pen, knn], i.e. model._name=wav2vec2_knnvq; this model returned "
                f"{1 if torch.is_tensor(losses) else len(losses)}. Use criterion._name=wav2vec "
                "with other models."
            )
        return losses


@register_criterion("wav2vec_knnvq", dataclass=Wav2VecKnnVqCriterionConfig)
class Wav2vecKnnVqCriterion(Wav2vecCriterion):
    def __init__(self, task, infonce=False, loss_weights=None, log_keys=None, knn_weight=0.1, knn_log_interval=1):
        log_keys = [] if log_keys is None else list(log_keys)
        for key in ("logits", "target"):
            if key in log_keys:
                raise RunConfigError(
                    f"criterion wav2vec_knnvq cannot log {key!r}: its logging outputs are "
                    f"summed across workers and {key!r} is an array; remove it from "
                    "criterion.log_keys"
                )
        super().__init__(
            task,
            infonce=infonce,
            loss_weights=self.extra_loss_weights(loss_weights, knn_weight),
            log_keys=[key for key in log_keys if key not in _ALWAYS_LOGGED],
        )
        if int(knn_log_interval) < 1:
            raise RunConfigError(
                f"criterion.knn_log_interval must be >= 1 (updates between logged KNN losses), got {knn_log_interval}"
            )
        self.knn_log_interval = int(knn_log_interval)
        self.check_knn_rows = FewKnnRowsCheck()

    def tracks_knn_loss(self, model) -> bool:
        """Whether this forward call computes the KNN loss of a variant that does not train
        on it: always in validation; in training, in the updates whose logs fairseq writes
        (``fairseq_cli/train.py`` logs after update ``u`` when ``u % log_interval == 0``;
        the trainer passes the update count before the step, ``u - 1``, to the model)."""
        if not model.training:
            return True
        return (int(getattr(model, "num_updates", 0)) + 1) % self.knn_log_interval == 0

    @staticmethod
    def extra_loss_weights(loss_weights, knn_weight: float) -> List[float]:
        """Weights of ``[diversity, features_pen, knn]``: the stock weights (None: no
        extra loss; one value: for both, as fairseq broadcasts it) plus ``knn_weight``."""
        if loss_weights is None:
            stock = [0.0, 0.0]
        else:
            stock = [float(w) for w in loss_weights]
            if len(stock) == 1:
                stock = stock * 2
            if len(stock) != 2:
                raise RunConfigError(
                    "criterion.loss_weights are fairseq's weights of the diversity loss and "
                    f"the feature penalty, e.g. [0.1, 10]; got {stock}. Set the weight of the "
                    "KNN loss with criterion.knn_weight."
                )
        return stock + [float(knn_weight)]

    def forward(self, model, sample, reduce=True):
        recorder = _NetOutputRecorder(model)
        tracking = getattr(model, "knn_tracking", None)
        with tracking(self.tracks_knn_loss(model)) if tracking is not None else contextlib.nullcontext():
            loss, sample_size, logging_output = super().forward(recorder, sample, reduce=reduce)
        logging_output[COUNT_KEY] = 1
        logging_output.update(host_logging_output(recorder.net_output))
        self.check_knn_rows(model, logging_output)  # reads the host copy of knn_rows
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Logs the pooled code usage, then fairseq's metrics of the summed outputs."""
        log_code_usage(logging_outputs)
        Wav2vecCriterion.reduce_metrics([pool_logging_outputs(logging_outputs)])

    def logging_outputs_can_be_summed(self) -> bool:
        return True


def host_logging_output(net_output: Mapping[str, Any]) -> Dict[str, Any]:
    """The criterion's additions to fairseq's logging output, read back in one
    device-to-host copy: ``knn_loss`` and ``diversity_loss`` (unweighted, under their own
    names for every variant: fairseq's loss_N numbering shifts with the terms a variant
    trains), ``knn_rows`` and ``knn_rows_per_vertex`` as floats, and the code usage sums
    (the CPU tensor of :func:`~.usage_logging.usage_logging_output`). One host sync per
    step on a GPU for all of them, where one per value would follow (fairseq's criterion
    reads its values with ``.item()``; its trainer reads every meter after every step)."""
    scalars = {key: net_output[key].detach() for key in ("knn_loss", "diversity_loss") if key in net_output}
    scalars.update(knn_rows_logging_output(net_output))
    usage: Optional[CodeUsage] = net_output.get("usage_sums")
    parts = [value.double().reshape(1) for value in scalars.values()]
    if usage is not None:
        parts.append(usage.to_flat().detach())
    if not parts:
        return {}
    values = torch.cat(parts).tolist()  # the one copy
    logged: Dict[str, Any] = dict(zip(scalars, values))
    if usage is not None:  # the entry of usage_logging_output, from the host copy
        key = f"{USAGE_KEY_PREFIX}{usage.groups}x{usage.num_vars}"
        logged[key] = torch.tensor(values[len(scalars) :], dtype=torch.float64)
    return logged


def pool_logging_outputs(logging_outputs: List[Mapping[str, Any]]) -> Dict[str, Any]:
    """One logging output equivalent to ``logging_outputs`` for fairseq's reduce_metrics:
    sums, except the keys fairseq averages (not a loss, not a count), which become their
    mean over the original outputs. Works on outputs that were already summed across
    workers, because those carry the count of the outputs they sum."""
    count = sum(utils.item(log.get(COUNT_KEY, 1)) for log in logging_outputs)
    pooled: Dict[str, Any] = {}
    for log in logging_outputs:
        for key, value in log.items():
            if key == COUNT_KEY or is_usage_key(key):
                continue
            if torch.is_tensor(value) and value.numel() == 1:
                # Averaged keys stay tensors: fairseq's meters read them only when a log
                # line is written, so logging costs no host sync per step.
                averaged = key not in _SUMMED_KEYS and not key.startswith("loss")
                value = value.detach().reshape(()) if averaged else utils.item(value)
            pooled[key] = pooled.get(key, 0) + value
    for key in pooled:
        if key not in _SUMMED_KEYS and not key.startswith("loss"):
            pooled[key] = pooled[key] / max(count, 1)
    return pooled
