"""knnvq-ngram-lm writes an ARPA file that KenLM (flashlight-text's, the one knnvq-infer
--lm uses) loads, and KenLM's scores are the probabilities computed here by hand from the
counts of a three-sentence corpus."""

import math
from pathlib import Path

import pytest

from fairseq_knnvq.cli import ngram_lm

decoder = pytest.importorskip("flashlight.lib.text.decoder", reason="the lm extra (flashlight-text) is not installed")
dictionary = pytest.importorskip("flashlight.lib.text.dictionary")
KenLM = pytest.importorskip("flashlight.lib.text.decoder.kenlm").KenLM

CORPUS = "A B\nA C\n\nB A B\n"  # the empty line is skipped

# By hand, from <s> A B </s> / <s> A C </s> / <s> B A B </s>:
# unigrams (<s> is never predicted): A 3, B 3, C 1, </s> 3; 10 tokens, 4 types; no unigram
# is seen twice... so Ney's D1 = n1 / (n1 + 2 n2) has n2 = 0 -> the fallback 0.5.
# vocabulary: A B C </s> <unk> (5)
D1, D2 = 0.5, 4 / (4 + 2 * 3)  # bigrams seen once: A C, C </s>, <s> B, B A; twice: <s> A, A B, B </s>
P1 = {w: max(c - D1, 0) / 10 + D1 * 4 / 10 / 5 for w, c in {"A": 3, "B": 3, "C": 1, "</s>": 3, "<unk>": 0}.items()}
GAMMA = {"<s>": D2 * 2 / 3, "A": D2 * 2 / 3, "B": D2 * 2 / 3, "C": D2 * 1 / 1}  # D2 * N1+(h .) / c(h .)
P2 = {  # P(w | h) for the bigrams seen: (c(h w) - D2) / c(h .) + gamma(h) P1(w)
    ("<s>", "A"): (2 - D2) / 3 + GAMMA["<s>"] * P1["A"],
    ("<s>", "B"): (1 - D2) / 3 + GAMMA["<s>"] * P1["B"],
    ("A", "B"): (2 - D2) / 3 + GAMMA["A"] * P1["B"],
    ("A", "C"): (1 - D2) / 3 + GAMMA["A"] * P1["C"],
    ("B", "</s>"): (2 - D2) / 3 + GAMMA["B"] * P1["</s>"],
    ("B", "A"): (1 - D2) / 3 + GAMMA["B"] * P1["A"],
    ("C", "</s>"): (1 - D2) / 1 + GAMMA["C"] * P1["</s>"],
}


def bigram(history: str, word: str) -> float:
    return P2.get((history, word), GAMMA[history] * P1[word])  # unseen: backed off


def kenlm_log10(arpa: Path, sentence: str) -> float:
    words = dictionary.Dictionary()
    for word in ["A", "B", "C", "D", "<unk>"]:
        words.add_entry(word)
    lm = KenLM(str(arpa), words)
    state, total = lm.start(False), 0.0
    for word in sentence.split():
        state, score = lm.score(state, words.get_index(word))
        total += score
    return total + lm.finish(state)[1]


@pytest.fixture()
def arpa(tmp_path: Path) -> Path:
    (tmp_path / "train.wrd").write_text(CORPUS)
    output = tmp_path / "lm" / "train.2gram.arpa"
    ngram_lm.main([str(tmp_path / "train.wrd"), "--order", "2", "--output", str(output)])
    return output


def test_hand_computed_model_sums_to_one():
    """The reference itself: every history's distribution over the vocabulary sums to 1."""
    assert sum(P1.values()) == pytest.approx(1.0, abs=1e-12)
    for history in GAMMA:
        assert sum(bigram(history, w) for w in P1) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "sentence, words",
    [
        ("A B", [("<s>", "A"), ("A", "B"), ("B", "</s>")]),
        ("C A", [("<s>", "C"), ("C", "A"), ("A", "</s>")]),  # two unseen bigrams
        ("B A C", [("<s>", "B"), ("B", "A"), ("A", "C"), ("C", "</s>")]),
        ("D", [("<s>", "<unk>"), ("<unk>", "</s>")]),  # out of the vocabulary
    ],
)
def test_kenlm_scores_are_the_hand_computed_probabilities(arpa: Path, sentence, words):
    expected = 0.0
    for history, word in words:
        # <unk> was never a history: its P(. | <unk>) is the unigram's.
        expected += math.log10(P1[word] if history == "<unk>" else bigram(history, word))
    # The ARPA file holds 7 decimals of each log10; a sentence sums a few of them.
    assert kenlm_log10(arpa, sentence) == pytest.approx(expected, abs=1e-6)


def test_the_file_lists_every_ngram_with_backoffs(arpa: Path):
    text = arpa.read_text()
    assert "ngram 1=6\nngram 2=7\n" in text  # <s> A B C </s> <unk>; the 7 bigrams seen
    unigram_lines = text.split("\\1-grams:\n")[1].split("\n\n")[0].splitlines()
    entries = {line.split("\t")[1]: line.split("\t") for line in unigram_lines}
    assert float(entries["C"][0]) == pytest.approx(math.log10(P1["C"]), abs=1e-7)
    assert float(entries["C"][2]) == pytest.approx(math.log10(GAMMA["C"]), abs=1e-7)
    assert len(entries["</s>"]) == 2  # never a history: no backoff


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--order", "1"], "--order must be at least 2"),
        (["--order", "3", "missing.wrd"], "missing.wrd does not exist"),
        (["--order", "3", "empty.wrd"], "hold no text"),
    ],
)
def test_errors(tmp_path: Path, argv, message):
    (tmp_path / "empty.wrd").write_text("\n \n")
    (tmp_path / "train.wrd").write_text(CORPUS)
    files = [str(tmp_path / a) if a.endswith(".wrd") else a for a in argv]
    if not any(a.endswith(".wrd") for a in argv):
        files.append(str(tmp_path / "train.wrd"))
    output = tmp_path / "out" / "lm.arpa"
    with pytest.raises(SystemExit) as raised:
        ngram_lm.main([*files, "--output", str(output)])
    assert str(raised.value.code).startswith("knnvq-ngram-lm: error: ") and message in str(raised.value.code)
    assert not output.exists()
