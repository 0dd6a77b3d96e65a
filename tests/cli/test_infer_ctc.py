"""knnvq-infer's errors for inputs that are wrong before any model is loaded. Decoding
real fine-tuned checkpoints (and the errors that need one) is in test_finetuning_e2e.py;
the greedy decoding and error rates are tested in tests/fairseq/test_ctc_scoring.py."""

from pathlib import Path

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
from fairseq_knnvq.cli import infer_ctc


def _error_of(argv, capsys=None):
    with pytest.raises(SystemExit) as exit_info:
        infer_ctc.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("knnvq-infer: error: "), message
    return message


def test_missing_checkpoint_is_named(tmp_path: Path):
    missing = tmp_path / "nowhere" / "checkpoint_best.pt"
    message = _error_of([str(missing), "--data", str(tmp_path), "--subset", "dev"])
    assert str(missing) in message and "does not exist" in message


def test_a_file_that_is_no_checkpoint_is_named(tmp_path: Path):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint\n")
    message = _error_of([str(not_a_checkpoint), "--data", str(tmp_path), "--subset", "dev"])
    assert f"{not_a_checkpoint} is not a checkpoint: neither a PyTorch zip archive nor a pickle" in message


@pytest.mark.parametrize("option", ["--max-tokens", "--batch-size"])
def test_batch_limits_must_be_positive(tmp_path: Path, option: str):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")
    message = _error_of([str(checkpoint), "--subset", "dev", option, "0"])
    assert option in message and "positive" in message


# --- beam-search options: checked before the checkpoint is read ----------------------


def _beam_error(tmp_path: Path, *options: str) -> str:
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")  # never read: the options are checked first
    return _error_of([str(checkpoint), "--subset", "dev", *options])


def test_missing_lm_extra_is_named(tmp_path: Path, monkeypatch):
    import sys

    (tmp_path / "lm.arpa").write_text("")
    monkeypatch.setitem(sys.modules, "flashlight", None)  # as if flashlight-text were not installed
    monkeypatch.setitem(sys.modules, "flashlight.lib", None)
    monkeypatch.setitem(sys.modules, "flashlight.lib.text", None)
    message = _beam_error(tmp_path, "--lm", str(tmp_path / "lm.arpa"))
    assert "--lm needs flashlight-text" in message and "pip install 'fairseq-knnvq[lm]'" in message


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--decoder", "greedy", "--beam", "5"], "--beam are options of the beam search: drop --decoder greedy"),
        (["--lexicon", "LEX"], "a lexicon search needs a word language model: give --lm"),
        (["--lm", "LM", "--lexicon", "LEX", "--lexicon-words", "LEX"], "give --lexicon or --lexicon-words, not both"),
        (["--lm", "NOWHERE"], "--lm NOWHERE does not exist"),
        (["--decoder", "beam", "--beam", "0"], "--beam and --beam-size-token must be at least 1"),
    ],
)
def test_beam_option_errors(tmp_path: Path, options, expected):
    pytest.importorskip("flashlight.lib.text.decoder")
    for name in ("LM", "LEX"):
        (tmp_path / name).write_text("x\n")
    options = [str(tmp_path / o) if o in ("LM", "LEX", "NOWHERE") else o for o in options]
    message = _beam_error(tmp_path, *options)
    assert expected.replace("NOWHERE", str(tmp_path / "NOWHERE")) in message


def test_lexicon_files_are_checked_against_the_units(tmp_path: Path):
    from fairseq_knnvq.evaluation.beam_search import BeamSearchError, check_spellings, lexicon_from_words, read_lexicon

    symbols = ["<s>", "<pad>", "</s>", "<unk>", "|", "A", "B", "C"]
    (tmp_path / "words.txt").write_text("AB CAB\nAB BA\n")
    entries = lexicon_from_words(tmp_path / "words.txt", symbols)
    assert [(w, s) for w, s, _ in entries] == [
        ("AB", ["A", "B", "|"]),
        ("CAB", ["C", "A", "B", "|"]),
        ("BA", ["B", "A", "|"]),
    ]
    check_spellings(entries, {s: i for i, s in enumerate(symbols)}, "words")  # all known: no error
    (tmp_path / "lexicon.txt").write_text("AB\tA B |\n\nABD A B D |\n")
    with pytest.raises(BeamSearchError) as raised:
        check_spellings(read_lexicon(tmp_path / "lexicon.txt"), {s: i for i, s in enumerate(symbols)}, "lexicon L")
    assert str(raised.value).startswith(
        "lexicon L: 1 words are spelled with units the model does not have (D), e.g. line 3: ABD -> A B D |"
    )
    (tmp_path / "bad.txt").write_text("AB\n")
    with pytest.raises(BeamSearchError, match="line 1: 'AB' has a word but no spelling"):
        read_lexicon(tmp_path / "bad.txt")
    with pytest.raises(BeamSearchError, match="not a letter model"):
        lexicon_from_words(tmp_path / "words.txt", ["<s>", "\u2581A", "B"])
