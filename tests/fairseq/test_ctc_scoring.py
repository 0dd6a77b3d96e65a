"""Scoring a CTC model (fairseq_knnvq.evaluation.speech): greedy CTC collapsing, WER/CER
against a brute-force edit distance, units to words as fairseq's CTC criterion does it.
Decoding real fine-tuned checkpoints is in tests/e2e/test_finetuning_e2e.py."""

import itertools
import random

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
from fairseq_knnvq.evaluation import speech


def levenshtein(reference, hypothesis):
    """Textbook dynamic programme: substitutions, insertions and deletions cost 1."""
    rows = len(reference) + 1
    cols = len(hypothesis) + 1
    table = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        table[i][0] = i
    for j in range(cols):
        table[0][j] = j
    for i in range(1, rows):
        for j in range(1, cols):
            substitution = table[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1])
            table[i][j] = min(substitution, table[i - 1][j] + 1, table[i][j - 1] + 1)
    return table[-1][-1]


def test_greedy_ctc_collapses_repeats_and_drops_the_blank():
    blank = 0
    # frames "H H _ E L L _ L O" -> H E L L O: a blank between two Ls keeps both.
    assert speech.ctc_greedy_units([5, 5, 0, 6, 7, 7, 0, 7, 8], blank) == [5, 6, 7, 7, 8]
    assert speech.ctc_greedy_units([0, 0, 0], blank) == []
    assert speech.ctc_greedy_units([], blank) == []
    rng = random.Random(0)
    for _ in range(200):
        frames = [rng.choice([0, 0, 1, 2, 3]) for _ in range(rng.randint(0, 30))]
        expected = [unit for unit, _ in itertools.groupby(frames) if unit != blank]
        assert speech.ctc_greedy_units(frames, blank) == expected


def test_error_rates_match_brute_force_edit_distance():
    rng = random.Random(1)
    vocabulary = ["A", "B", "CAT", "DOG", "GO", "NO"]
    references, hypotheses = [], []
    for _ in range(50):
        references.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 6))))
        hypotheses.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 7))))
    wer = speech.word_error_rate(references, hypotheses)
    cer = speech.char_error_rate(references, hypotheses)
    assert wer.errors == sum(levenshtein(r.split(), h.split()) for r, h in zip(references, hypotheses))
    assert wer.reference_length == sum(len(r.split()) for r in references)
    assert cer.errors == sum(levenshtein(r, h) for r, h in zip(references, hypotheses))
    assert cer.reference_length == sum(len(r) for r in references)
    assert wer.percent == pytest.approx(100 * wer.errors / wer.reference_length)


def test_error_rate_examples():
    # one substitution and one deletion: 2 errors in 3 words; insertions can exceed 100%.
    assert speech.word_error_rate(["A B C"], ["A X"]).percent == pytest.approx(200 / 3)
    assert speech.word_error_rate(["A"], ["B C D"]).percent == pytest.approx(300.0)
    # CER counts the space between words; extra spaces in a hypothesis do not count.
    assert speech.char_error_rate(["AB CD"], ["AB  CD"]).errors == 0
    assert speech.char_error_rate(["AB CD"], ["ABCD"]).errors == 1


def test_units_to_words_as_fairseq_post_process():
    assert speech.units_to_words("K I N G | O N | G R E E N |", "letter") == "KING ON GREEN"
    assert speech.units_to_words("D O N ' T |", "letter") == "DON'T"
    assert speech.units_to_words("\u2581KING \u2581ON \u2581GRE EN", "sentencepiece") == "KING ON GREEN"
    assert speech.units_to_words("", "letter") == ""


def test_post_process_is_detected_from_the_dictionary():
    assert speech.detect_post_process(["<s>", "<pad>", "</s>", "<unk>", "|", "E", "T"]) == "letter"
    assert speech.detect_post_process(["<s>", "<pad>", "</s>", "<unk>", "\u2581KING", "N"]) == "sentencepiece"
    assert speech.detect_post_process(["<s>", "<pad>", "</s>", "<unk>", "KING", "ON"]) == "none"
