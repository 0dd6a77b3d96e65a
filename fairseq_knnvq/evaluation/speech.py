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


def decode_subset(model, task, subset: str, batching: Batching, device: str, progress: bool) -> list[list[int]]:
    """Greedy CTC units of every utterance of ``subset``, in manifest order."""
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
    blank = task.target_dictionary.index(task.blank_symbol) if hasattr(task, "blank_symbol") else task.target_dictionary.bos()
    iterator = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=batching.max_tokens,
        max_sentences=batching.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=False,
        required_batch_size_multiple=batching.required_batch_size_multiple,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    results: list[list[int] | None] = [None] * len(dataset)
    with torch.inference_mode(), tqdm.tqdm(total=len(dataset), unit="utt", desc=f"decoding {subset}", disable=not progress) as bar:
        for sample in iterator:
            if device != "cpu":
                sample = utils.move_to_cuda(sample, device=torch.device(device))
            net_output = model(**sample["net_input"])
            frame_argmax = model.get_logits(net_output).argmax(dim=-1).transpose(0, 1)  # (B, T)
            padding_mask = net_output.get("padding_mask")
            for row, sample_id in enumerate(sample["id"].tolist()):
                frames = frame_argmax[row]
                if padding_mask is not None:
                    frames = frames[~padding_mask[row]]
                results[sample_id] = ctc_greedy_units(frames.tolist(), blank)
            bar.update(len(sample["id"]))
    not_decoded = [i for i, units in enumerate(results) if units is None]
    if not_decoded:
        raise RuntimeError(f"{len(not_decoded)} utterances of {subset} were not decoded (first: line {not_decoded[0] + 2})")
    return results  # type: ignore[return-value]
