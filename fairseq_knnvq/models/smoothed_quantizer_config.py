"""The smoothed quantizer's options, one dataclass for both models.

``wav2vec2_knnvq`` and ``vq_image_autoencoder`` both derive their config from
:class:`SmoothedQuantizerConfig`, so an option of
:class:`~fairseq_knnvq.quantization.SmoothedVectorQuantizer` has one name, one set of
choices and one help text for speech and images (``model.smoothing``,
``model.regularizer``, ``model.knn_k``, ``model.knn_distance``, ``model.knn_input``,
``model.knn_global``). The codebook size, groups and temperature are fairseq's
``latent_vars``, ``latent_groups`` and ``latent_temp`` in both models (wav2vec 2.0 defines
them; the image model uses the same names).
"""

from dataclasses import dataclass, field
from typing import Any, Dict

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..preflight import RunConfigError
from ..quantization import KNN_DISTANCES, REGULARIZERS, SMOOTHING_MODES, TemperatureSchedule
from ..quantization.quantizer import KNN_INPUTS
from ..quantization.smoothing import TEMPERATURE_RULE

SMOOTHING_CHOICES = ChoiceEnum(list(SMOOTHING_MODES))
REGULARIZER_CHOICES = ChoiceEnum(list(REGULARIZERS))
KNN_DISTANCE_CHOICES = ChoiceEnum(list(KNN_DISTANCES))
KNN_INPUT_CHOICES = ChoiceEnum(list(KNN_INPUTS))


@dataclass
class SmoothedQuantizerConfig(FairseqDataclass):
    smoothing: SMOOTHING_CHOICES = field(  # type: ignore[valid-type]
        default="gumbel_hard",
        metadata={
            "help": "how the quantizer turns logits into a code-selection vector: softmax, "
            "gumbel (soft sample), gumbel_hard (straight-through Gumbel, stock wav2vec 2.0) "
            "or ste (hard argmax forward, softmax backward)"
        },
    )
    regularizer: REGULARIZER_CHOICES = field(  # type: ignore[valid-type]
        default="knn",
        metadata={
            "help": "regulariser of the code-selection vectors: knn (KNN-to-simplex-vertex "
            "loss), diversity (wav2vec 2.0's prob-perplexity loss) or none"
        },
    )
    knn_k: int = field(default=8, metadata={"help": "K: smoothed vectors pulled towards each codebook vertex"})
    knn_distance: KNN_DISTANCE_CHOICES = field(  # type: ignore[valid-type]
        default="ce",
        metadata={"help": "distance to a vertex: ce (-log p_m) or l2 (||e_m - p||^2)"},
    )
    knn_input: KNN_INPUT_CHOICES = field(  # type: ignore[valid-type]
        default="smoothed",
        metadata={
            "help": "vectors the KNN loss acts on: smoothed (the ones used in the forward "
            "pass, e.g. the Gumbel sample) or probs (noise-free softmax(logits / temp))"
        },
    )
    knn_global: bool = field(
        default=False,
        metadata={
            "help": "choose each vertex's K neighbours from the batch of all workers "
            "(distributed training) instead of each worker's own batch"
        },
    )


def shared_field(name: str, default: Any) -> Any:
    """The shared option ``name`` with another default (same help text), for a model
    whose default differs (declare it again with this as its value)."""
    return field(default=default, metadata=SmoothedQuantizerConfig.__dataclass_fields__[name].metadata)


def smoothed_quantizer_options(cfg: SmoothedQuantizerConfig) -> Dict[str, Any]:
    """The keyword arguments of ``SmoothedVectorQuantizer`` that these options set."""
    return dict(
        smoothing=str(cfg.smoothing),
        regularizer=str(cfg.regularizer),
        knn_k=cfg.knn_k,
        knn_distance=str(cfg.knn_distance),
        knn_input=str(cfg.knn_input),
        knn_global=bool(cfg.knn_global),
    )


def checked_temperature(latent_temp: Any) -> TemperatureSchedule:
    """``model.latent_temp`` as the quantizer's schedule, checked by the schedule's own
    rule (:meth:`TemperatureSchedule.values_of`, :meth:`TemperatureSchedule.holds`).
    Both models call it before building a module; a bad value raises
    :class:`RunConfigError` naming the option and a valid value."""
    example = "e.g. model.latent_temp='[2.0,0.5,0.999995]'"
    values = TemperatureSchedule.values_of(latent_temp)
    if values is None:
        raise RunConfigError(f"model.latent_temp must be (start, end, decay), got {latent_temp!r}; {example}")
    if not TemperatureSchedule.holds(*values):
        raise RunConfigError(
            f"model.latent_temp (start, end, decay) needs {TEMPERATURE_RULE}, got {latent_temp!r}; {example}"
        )
    return TemperatureSchedule(*values)
