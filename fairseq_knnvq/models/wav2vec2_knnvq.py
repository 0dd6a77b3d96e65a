"""wav2vec 2.0 with the KNN-regularised smoothed quantizer (``model._name=wav2vec2_knnvq``).

A subclass of fairseq's ``Wav2Vec2Model``: the CNN, masking, transformer, negatives and
contrastive logits are fairseq's own code. Only the quantizers are swapped for
:class:`~fairseq_knnvq.quantization.SmoothedVectorQuantizer`, built with the arguments
fairseq uses and loaded with the weights fairseq drew, so parameter names match and a
stock ``wav2vec2`` state dict loads. With ``regularizer=diversity`` and
``smoothing=gumbel_hard`` the model computes exactly what stock wav2vec 2.0 computes.

``get_extra_losses`` returns three terms in fixed positions, whatever the variant:

    [diversity (or None), features_pen, knn (or None)]

so one set of weights fits every config: the stock ``loss_weights: [0.1, 10]`` for the
first two, and the KNN weight third (the ``wav2vec_knnvq`` criterion appends its
``knn_weight``; with fairseq's ``wav2vec`` criterion pass ``loss_weights: [0.1, 10, λ]``).
fairseq's criterion skips ``None`` terms.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from fairseq.data.data_utils import compute_mask_indices
from fairseq.models import register_model
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

from . import dummy_batches
from ..preflight import RunConfigError
from ..quantization import SmoothedVectorQuantizer
from .smoothed_quantizer_config import SmoothedQuantizerConfig, checked_temperature, smoothed_quantizer_options

# Positions of the terms in get_extra_losses (and in the criterion's weights).
EXTRA_LOSS_NAMES = ("diversity", "features_pen", "knn")


@dataclass
class Wav2Vec2KnnVqConfig(Wav2Vec2Config, SmoothedQuantizerConfig):
    """fairseq's wav2vec 2.0 options, the smoothed quantizer's (shared with the image
    model) and the speech-only ones below."""

    diversity_counts_padding: bool = field(
        default=True,
        metadata={
            "help": "with regularizer=diversity: quantizers that see padded frames "
            "(quantize_input; negatives_from_everywhere) count them in the diversity loss, "
            "the perplexities, the usage statistics and the logged KNN loss, as stock "
            "wav2vec 2.0 counts them, so this variant is exactly the stock baseline "
            "(default); false excludes padded frames as the KNN variants always do"
        },
    )
    seeded_masks: bool = field(
        default=True,
        metadata={
            "help": "draw the time masks (and channel masks applied after the time masks) "
            "from generators seeded by (the seed fairseq sets for the update, the worker, "
            "the forward call), so the same common.seed gives the same run, also after a "
            "resume; false: stock fairseq's unseeded masks"
        },
    )


def check_quantizer_options(cfg: Wav2Vec2KnnVqConfig) -> None:
    """Raises :class:`RunConfigError` (a ``ValueError`` printed without a traceback)
    naming the ``model.*`` option and a valid value, before any module is built (a bad
    value otherwise fails deep inside the quantizer, or, ``latent_vars=1``, trains a
    codebook of one code per group)."""

    def positive(name: str, meaning: str, example: str, least: int = 1) -> None:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < least:
            wanted = "a positive integer" if least == 1 else f"an integer of at least {least}"
            raise RunConfigError(
                f"model.{name} must be {wanted} ({meaning}), got {value!r}; e.g. model.{name}={example}"
            )

    positive("knn_k", "K, the smoothed vectors pulled towards each codebook vertex", "8")
    # One entry per group is no code choice at all (every frame gets the same code).
    positive("latent_vars", "codebook entries per group", "320", least=2)
    positive("latent_groups", "codebook groups", "2")
    positive("quantizer_depth", "layers of the quantizer's projection", "1")
    checked_temperature(cfg.latent_temp)


@register_model("wav2vec2_knnvq", dataclass=Wav2Vec2KnnVqConfig)
class Wav2Vec2KnnVqModel(dummy_batches.MarksDummyBatches, Wav2Vec2Model):
    """``Wav2Vec2Model`` whose quantizers are :class:`SmoothedVectorQuantizer`.

    ``forward`` returns fairseq's keys plus ``knn_loss`` (summed over the quantizers the
    model runs: the target quantizer and, with ``quantize_input``, the input quantizer)
    and, from the target quantizer (or the input quantizer when there are no quantized
    targets), ``usage_sums`` (its summable usage statistics) and ``diversity_loss`` (the
    value ``get_extra_losses`` trains on). Frames that are padding never
    enter the regulariser or the statistics.
    """

    def __init__(self, cfg: Wav2Vec2KnnVqConfig):
        check_quantizer_options(cfg)
        super().__init__(cfg)
        stock_quantizer = self.quantizer
        if self.quantizer is not None:
            self.quantizer = self._smoothed_like(self.quantizer, cfg)
        if self.input_quantizer is not None:
            if self.input_quantizer is stock_quantizer:  # same_quantizer
                self.input_quantizer = self.quantizer
            else:
                self.input_quantizer = self._smoothed_like(self.input_quantizer, cfg)

        # [torch seed, forward calls since it was set]: see _mask_seed.
        self._mask_calls = [None, 0]
        # Filled by the quantizers' hooks during one forward call (None outside it).
        self._quantizer_outputs: Optional[List[Dict[str, Any]]] = None
        self._feature_lengths: Optional[torch.Tensor] = None
        # Whether the forward call in progress is on a dummy batch (MarksDummyBatches).
        self._batch_is_dummy = False
        self.num_updates = 0
        for quantizer in {id(q): q for q in (self.quantizer, self.input_quantizer) if q is not None}.values():
            quantizer.register_forward_pre_hook(self._before_quantizer, with_kwargs=True)
            quantizer.register_forward_hook(self._after_quantizer)

    def _mask_seed(self) -> int:
        """A seed for this forward call's masks: a function of the torch seed that fairseq's
        trainer sets before every update (``common.seed + num_updates``), the worker's rank
        and the number of calls since that seed was set (gradient accumulation,
        validation batches). It draws nothing from torch's generator, so everything else
        (negatives, Gumbel noise, dropout) draws what stock wav2vec 2.0 draws."""
        torch_seed = torch.initial_seed()
        if self._mask_calls[0] != torch_seed:
            self._mask_calls = [torch_seed, 0]
        self._mask_calls[1] += 1
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        return hash((torch_seed, rank, self._mask_calls[1])) & 0x7FFFFFFF

    def apply_mask(self, x, padding_mask, mask_indices=None, mask_channel_indices=None):
        """fairseq's masking, with the masks drawn from seeded generators (``seeded_masks``).

        fairseq's ``compute_mask_indices`` draws from ``np.random.default_rng(None)`` (fresh
        OS entropy) unless it is given a seed; here it gets one per forward call, and
        fairseq's ``apply_mask`` then uses the masks as if they had been passed in. Channel
        masks applied before the time masks (``mask_channel_before``) stay stock. Nothing
        here reads a tensor back to the host beyond what stock's masking reads (the
        padding mask's row sums)."""
        if not self.cfg.seeded_masks:
            return super().apply_mask(x, padding_mask, mask_indices, mask_channel_indices)
        B, T, C = x.shape
        seed = self._mask_seed()
        # fairseq seeds utterance i's generator with hash((seed, epoch, indices[i].item())):
        # numpy indices give the same Python ints as torch.arange(B) without a tensor read
        utterances = np.arange(B)
        if self.mask_prob > 0 and mask_indices is None:
            mask_indices = torch.from_numpy(
                compute_mask_indices(
                    (B, T),
                    padding_mask,
                    self.mask_prob,
                    self.mask_length,
                    self.mask_selection,
                    self.mask_other,
                    min_masks=2,
                    no_overlap=self.no_mask_overlap,
                    min_space=self.mask_min_space,
                    require_same_masks=self.cfg.require_same_masks,
                    mask_dropout=self.cfg.mask_dropout,
                    seed=seed,
                    epoch=0,
                    indices=utterances,
                )
            ).to(x.device)
        if self.mask_channel_prob > 0 and not self.mask_channel_before and mask_channel_indices is None:
            channels = compute_mask_indices(
                (B, C),
                None,
                self.mask_channel_prob,
                self.mask_channel_length,
                self.mask_channel_selection,
                self.mask_channel_other,
                no_overlap=self.no_mask_channel_overlap,
                min_space=self.mask_channel_min_space,
                seed=seed,
                epoch=1,
                indices=utterances,
            )
            mask_channel_indices = torch.from_numpy(channels).to(x.device).unsqueeze(1).expand(-1, T, -1)
        return super().apply_mask(x, padding_mask, mask_indices, mask_channel_indices)

    def _smoothed_like(self, stock, cfg: Wav2Vec2KnnVqConfig) -> SmoothedVectorQuantizer:
        """A SmoothedVectorQuantizer with the arguments and the weights of fairseq's
        GumbelVectorQuantizer ``stock``. The CPU random state is restored afterwards, so
        a seeded construction draws the same numbers as stock wav2vec 2.0 for everything
        built later (and the same weights here)."""
        with torch.random.fork_rng(devices=[]):
            quantizer = SmoothedVectorQuantizer(
                dim=self.embed,
                num_vars=cfg.latent_vars,
                temp=cfg.latent_temp,
                groups=cfg.latent_groups,
                combine_groups=False,
                vq_dim=stock.vars.shape[-1] * cfg.latent_groups,
                time_first=True,
                weight_proj_depth=cfg.quantizer_depth,
                weight_proj_factor=cfg.quantizer_factor,
                **smoothed_quantizer_options(cfg),
            )
        # Strict: fails loudly if fairseq ever builds its quantizer differently.
        quantizer.load_state_dict(stock.state_dict())
        return quantizer

    def set_num_updates(self, num_updates):
        """fairseq's trainer calls this before every update (the quantizers' temperature
        follows it); the ``wav2vec_knnvq`` criterion reads ``num_updates`` to know whether
        the update's logs are written."""
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def smoothed_quantizers(self) -> List[SmoothedVectorQuantizer]:
        """The model's quantizers (one object once when ``same_quantizer``)."""
        found = {id(q): q for q in (self.quantizer, self.input_quantizer) if q is not None}
        return list(found.values())

    @contextlib.contextmanager
    def knn_tracking(self, enabled: bool):
        """Within the block, quantizers whose regulariser is not KNN compute the detached
        KNN loss they report only if ``enabled`` (a KNN search, and with ``knn_global``
        two collectives, that a baseline pays only to log a number). The setting before
        the block is restored after it."""
        quantizers = self.smoothed_quantizers()
        before = [q.track_knn_loss for q in quantizers]
        for q in quantizers:
            q.track_knn_loss = enabled
        try:
            yield
        finally:
            for q, value in zip(quantizers, before):
                q.track_knn_loss = value

    def _before_quantizer(self, module, args, kwargs):
        """Passes the valid-frame mask to quantizer calls that see padded frames, and an
        all-False mask to every call on a dummy batch.

        fairseq quantizes the masked frames ``y`` (never padding: masks are drawn inside
        each utterance's length) unless ``negatives_from_everywhere``; the input
        quantizer always sees every frame. The diversity variant leaves padded frames in
        when ``diversity_counts_padding`` (stock wav2vec 2.0 counts them)."""
        if self._quantizer_outputs is None:
            return None
        x = args[0]
        if self._batch_is_dummy:
            return args, dict(kwargs, mask=torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))
        if self._feature_lengths is None:
            return None
        is_input_call = self.input_quantizer is not None and not self._quantizer_outputs
        if not (is_input_call or self.negatives_from_everywhere):
            return None
        if self.cfg.regularizer == "diversity" and self.cfg.diversity_counts_padding:
            return None
        frames = torch.arange(x.shape[1], device=x.device)
        kwargs = dict(kwargs, mask=frames.unsqueeze(0) < self._feature_lengths.unsqueeze(1).to(x.device))
        return args, kwargs

    def _after_quantizer(self, module, args, output):
        if self._quantizer_outputs is not None:
            self._quantizer_outputs.append(output)

    def _get_feat_extract_output_lengths(self, input_lengths: torch.LongTensor):
        """fairseq's frame lengths of ``input_lengths`` samples. Within a forward call they
        are also kept as the batch's valid frames (``_before_quantizer``): fairseq's forward
        calls this exactly when the batch has padding (after its own
        ``padding_mask.any()``, before any quantizer runs), so the padding costs no host
        sync beyond stock's."""
        lengths = super()._get_feat_extract_output_lengths(input_lengths)
        if getattr(self, "_quantizer_outputs", None) is not None:
            self._feature_lengths = lengths
        return lengths

    def forward(self, source, padding_mask=None, mask=True, features_only=False, *args, **kwargs):
        is_dummy = self.take_dummy_mark()
        if features_only:
            return super().forward(source, padding_mask, mask, features_only, *args, **kwargs)
        self._quantizer_outputs = []
        self._feature_lengths = None  # set by fairseq's forward when there is padding
        self._batch_is_dummy = is_dummy
        try:
            result = super().forward(source, padding_mask, mask, features_only, *args, **kwargs)
            outputs = self._quantizer_outputs
        finally:
            self._quantizer_outputs = None
            self._feature_lengths = None
            self._batch_is_dummy = False
        knn_losses = [q["knn_loss"] for q in outputs if "knn_loss" in q]
        if knn_losses:
            result["knn_loss"] = torch.stack([loss.float() for loss in knn_losses]).sum()
        if outputs:
            # The last call is the target quantizer when there is one (it runs after the
            # encoder): the one whose perplexities fairseq reports.
            result["usage_sums"] = outputs[-1]["usage_sums"]
            result["diversity_loss"] = outputs[-1]["diversity_loss"]
            for key in ("knn_rows", "knn_rows_per_vertex"):
                if key in outputs[-1]:
                    result[key] = outputs[-1][key]
        return result

    def get_extra_losses(self, net_output) -> List[Optional[torch.Tensor]]:
        """``[diversity, features_pen, knn]``; a term the variant does not train is None."""
        diversity = features_pen = knn = None
        if self.cfg.regularizer == "diversity" and "diversity_loss" in net_output:
            diversity = net_output["diversity_loss"]
        if "features_pen" in net_output:
            features_pen = net_output["features_pen"]
        if self.cfg.regularizer == "knn" and "knn_loss" in net_output:
            knn = net_output["knn_loss"]
        return [diversity, features_pen, knn]


dummy_batches.install()
