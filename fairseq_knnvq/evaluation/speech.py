"""Scoring a CTC speech recogniser: greedy (Viterbi) decoding and word and character
error rates, as ``knnvq-infer`` (:mod:`fairseq_knnvq.cli.infer_ctc`) uses them.

- Greedy decoding (:func:`decode_subset`): the most likely unit of every non-padded
  frame, repeats collapsed, the blank dropped (:func:`ctc_greedy_units`), as fairseq's
  ``ctc`` criterion decodes during validation; units become words by fairseq's own
  ``post_process`` (:func:`units_to_words`).
- ``WER = sum_u edit_distance(ref_words_u, hyp_words_u) / sum_u |ref_words_u|`` and
  ``CER`` alike over characters (words joined by single spaces), summed over the subset
  before dividing, in percent (:class:`ErrorRate`).

fairseq is imported only by the functions that need it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class ErrorRate:
    """Edit-distance errors summed over a subset and the reference length they divide."""

    errors: int
    reference_length: int

    @property
    def percent(self) -> float:
        if self.reference_length == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return 100.0 * self.errors / self.reference_length


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRate:
    """Words are separated by whitespace."""
    import editdistance

    errors = sum(editdistance.eval(ref.split(), hyp.split()) for ref, hyp in zip(references, hypotheses))
    return ErrorRate(errors, sum(len(ref.split()) for ref in references))


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRate:
    """Characters of the words joined by single spaces (the convention of jiwer's cer)."""
    import editdistance

    def chars(text: str) -> str:
        return " ".join(text.split())

    errors = sum(editdistance.eval(chars(ref), chars(hyp)) for ref, hyp in zip(references, hypotheses))
    return ErrorRate(errors, sum(len(chars(ref)) for ref in references))


def ctc_greedy_units(frame_argmax: Sequence[int], blank: int) -> list[int]:
    """Best path to units: collapse repeated frames, then drop the blank."""
    units: list[int] = []
    previous = None
    for unit in frame_argmax:
        if unit != previous and unit != blank:
            units.append(unit)
        previous = unit
    return units


def detect_post_process(symbols: Sequence[str]) -> str:
    """How units become words, from the dictionary's symbols: ``|`` means letters
    (fairseq's ``letter``), pieces starting with ``\u2581`` mean ``sentencepiece``,
    anything else is taken as whole words (``none``)."""
    if "|" in symbols:
        return "letter"
    if any(symbol.startswith("\u2581") for symbol in symbols):
        return "sentencepiece"
    return "none"


def units_to_words(label_line: str, post_process: str) -> str:
    """A line of units (``H E L L O | W O R L D |``) as words (``HELLO WORLD``)."""
    from fairseq.data.data_utils import post_process as fairseq_post_process

    return " ".join(fairseq_post_process(label_line.strip(), post_process).split())


@dataclasses.dataclass(frozen=True)
class Batching:
    """How utterances are grouped: fairseq's ``max_tokens`` (audio samples per batch),
    ``max_sentences`` and ``required_batch_size_multiple``."""

    max_tokens: int | None
    batch_size: int | None
    required_batch_size_multiple: int


class _UnpaddedFirstBlock:
    """Runs the first block of fairseq's ``ConvFeatureExtractionModel`` (convolution,
    group norm over time, GELU) on each utterance's own samples, then pads the results
    with zeros to the batch's length.

    The group norm of wav2vec 2.0's default (``extractor_mode=default``) feature encoder
    normalises every channel over all time steps of a row, the zeros that pad a short
    utterance included, so a padded batch changes the features of its short utterances.
    The later blocks are convolutions without a norm: a frame that fairseq's padding mask
    keeps sees only frames computed from the utterance's own samples, so they run on the
    padded batch as before and the model's output for every kept frame is that of the
    utterance decoded alone."""

    def __init__(self, block, lengths) -> None:
        self.block = block
        self.lengths = lengths

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        rows = [self.block(x[row : row + 1, :, :length]) for row, length in enumerate(self.lengths)]
        width = max(r.shape[-1] for r in rows)
        return torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in rows], dim=0)


def group_norm_feature_extractors(model) -> list:
    """fairseq ``ConvFeatureExtractionModel`` modules of ``model`` whose first block
    normalises over time (group norm)."""
    import torch
    from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel

    return [
        m
        for m in model.modules()
        if isinstance(m, ConvFeatureExtractionModel)
        and any(isinstance(n, torch.nn.GroupNorm) for n in m.conv_layers[0].modules())
    ]


class padding_blind_features:
    """Within the block, the group-norm feature encoders of ``model`` run their first
    block per utterance (:class:`_UnpaddedFirstBlock`) for a batch whose audio lengths
    are ``lengths``; the model is unchanged afterwards. Without group norm, or without
    padding, nothing changes."""

    def __init__(self, model, lengths) -> None:
        self.extractors = group_norm_feature_extractors(model) if lengths is not None else []
        self.lengths = lengths

    def __enter__(self):
        self.saved = []
        for extractor in self.extractors:
            first = extractor.conv_layers[0]
            self.saved.append((extractor, first))
            # nn.ModuleList only holds Modules: swap the first block's forward instead.
            first.forward = _UnpaddedFirstBlock(first.__class__.forward.__get__(first), self.lengths)
        return self

    def __exit__(self, *exc) -> None:
        for _, first in self.saved:
            del first.forward


class GreedyDecoder:
    """CTC greedy (Viterbi) decoding of one utterance's (T, V) log-probabilities."""

    def __init__(self, blank: int) -> None:
        self.blank = blank

    def decode(self, log_probs) -> tuple[list[int], None]:
        return ctc_greedy_units(log_probs.argmax(dim=-1).tolist(), self.blank), None


def task_blank(task) -> int:
    """The CTC blank: the task's ``blank_symbol``, else the dictionary's ``<s>`` (as
    fairseq's ``ctc`` criterion)."""
    dictionary = task.target_dictionary
    return dictionary.index(task.blank_symbol) if hasattr(task, "blank_symbol") else dictionary.bos()


def decode_subset(model, task, subset: str, batching: Batching, device: str, progress: bool, decoder=None) -> list:
    """``decoder.decode(log_probs)`` of every utterance of ``subset``, in manifest order
    (default: greedy CTC units). ``log_probs`` is the (T, V) float32 CPU tensor of the
    utterance's frames that fairseq's padding mask keeps, as fairseq's ``ctc`` criterion
    computes it (``get_normalized_probs(log_probs=True)``). Every utterance gets exactly
    the log-probabilities it gets in a batch of its own (:class:`padding_blind_features`),
    so the hypotheses do not depend on the batching."""
    import torch
    import tqdm
    from fairseq import utils

    from ..data.audio import ReplaceUnreadableDataset

    task.load_dataset(subset)
    dataset = task.dataset(subset)
    if isinstance(dataset, ReplaceUnreadableDataset):
        # Scoring needs every utterance's own audio: an unreadable file is an error here
        # (fairseq's "Failed to load <path>"), not replaced by the next one.
        dataset = dataset.dataset
    if decoder is None:
        decoder = GreedyDecoder(task_blank(task))
    iterator = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=batching.max_tokens,
        max_sentences=batching.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=False,
        required_batch_size_multiple=batching.required_batch_size_multiple,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    results: list = [None] * len(dataset)
    with (
        torch.inference_mode(),
        tqdm.tqdm(total=len(dataset), unit="utt", desc=f"decoding {subset}", disable=not progress) as bar,
    ):
        for sample in iterator:
            if device != "cpu":
                sample = utils.move_to_cuda(sample, device=torch.device(device))
            audio_padding = sample["net_input"].get("padding_mask")
            lengths = None
            if audio_padding is not None and bool(audio_padding.any()):
                lengths = (~audio_padding).sum(dim=1).tolist()
            with padding_blind_features(model, lengths):
                net_output = model(**sample["net_input"])
            log_probs = (
                model.get_normalized_probs(net_output, log_probs=True).transpose(0, 1).float().cpu()
            )  # (B, T, V)
            padding_mask = net_output.get("padding_mask")
            if padding_mask is not None:
                padding_mask = padding_mask.cpu()
            for row, sample_id in enumerate(sample["id"].tolist()):
                frames = log_probs[row]
                if padding_mask is not None:
                    frames = frames[~padding_mask[row]]
                results[sample_id] = decoder.decode(frames.contiguous())
            bar.update(len(sample["id"]))
    not_decoded = [i for i, result in enumerate(results) if result is None]
    if not_decoded:
        raise RuntimeError(
            f"{len(not_decoded)} utterances of {subset} were not decoded (first: line {not_decoded[0] + 2})"
        )
    return results
