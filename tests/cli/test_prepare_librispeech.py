"""Tests of ``knnvq-prepare-librispeech`` and of the shipped tiny corpus, on real files."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

from fairseq_knnvq.cli import prepare_librispeech as prepare_cli
from fairseq_knnvq.preparation.librispeech import letter_labels

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CORPUS = REPO_ROOT / "examples" / "tiny_corpus" / "LibriSpeech"
TINY_CORPUS_SPLITS = ("train", "dev", "test")
MAX_CORPUS_BYTES = 8_000_000

# (speaker, chapter, utterance index, transcript)
TRAIN_UTTERANCES = [
    (19, 198, 0, "HELLO WORLD"),
    (19, 198, 1, "IT'S A DOG"),
    (19, 227, 0, "A CAT"),
    (26, 495, 0, "HELLO  HELLO"),  # double space: normalised like libri_labels.py does
]
DEV_UTTERANCES = [(84, 121, 0, "WORLD OF CATS"), (84, 121, 1, "ZEBRA")]


def write_librispeech_split(
    split_dir: Path, utterances: list[tuple[int, int, int, str]], sample_rate: int = 16000
) -> dict[str, Path]:
    """LibriSpeech layout: <spk>/<chap>/<spk>-<chap>-<utt:04d>.flac and a trans.txt per chapter."""
    rng = np.random.default_rng(0)
    paths: dict[str, Path] = {}
    lines: dict[Path, list[str]] = collections.defaultdict(list)
    for speaker, chapter, index, text in utterances:
        folder = split_dir / str(speaker) / str(chapter)
        folder.mkdir(parents=True, exist_ok=True)
        utterance = f"{speaker}-{chapter}-{index:04d}"
        num_frames = int(sample_rate * (0.1 + 0.05 * len(text)))
        soundfile.write(str(folder / f"{utterance}.flac"), 0.1 * rng.standard_normal(num_frames), sample_rate)
        lines[folder / f"{speaker}-{chapter}.trans.txt"].append(f"{utterance} {text}\n")
        paths[utterance] = folder / f"{utterance}.flac"
    for trans_path, trans_lines in lines.items():
        trans_path.write_text("".join(trans_lines), encoding="utf-8")
    return paths


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "LibriSpeech"
    write_librispeech_split(root / "train-clean-100", TRAIN_UTTERANCES)
    write_librispeech_split(root / "dev-other", DEV_UTTERANCES)
    return root


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def manifest_ids(tsv_path: Path) -> list[str]:
    return [Path(line.split("\t")[0]).name.split(".")[0] for line in read_lines(tsv_path)[1:]]


def test_letter_labels_match_fairseq_libri_labels() -> None:
    assert letter_labels("HELLO WORLD") == "H E L L O | W O R L D |"
    assert letter_labels("IT'S") == "I T ' S |"


def test_writes_tsv_wrd_ltr_and_dict(corpus: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    prepare_cli.main(
        [str(corpus), "--dest", str(dest), "--split", "train=train-clean-100", "--split", "dev_other=dev-other"]
    )
    assert sorted(p.name for p in dest.iterdir()) == [
        "dev_other.ltr",
        "dev_other.tsv",
        "dev_other.wrd",
        "dict.ltr.txt",
        "train.ltr",
        "train.tsv",
        "train.wrd",
    ]
    # Manifest order (sorted paths) decides the label order.
    assert read_lines(dest / "train.tsv")[0] == str((corpus / "train-clean-100").resolve())
    assert manifest_ids(dest / "train.tsv") == ["19-198-0000", "19-198-0001", "19-227-0000", "26-495-0000"]
    for line in read_lines(dest / "train.tsv")[1:]:
        relative_path, frames = line.split("\t")
        assert int(frames) == soundfile.info(str(corpus / "train-clean-100" / relative_path)).frames

    assert read_lines(dest / "train.wrd") == ["HELLO WORLD", "IT'S A DOG", "A CAT", "HELLO HELLO"]
    assert (dest / "train.ltr").read_text(encoding="utf-8") == (
        "H E L L O | W O R L D |\nI T ' S | A | D O G |\nA | C A T |\nH E L L O | H E L L O |\n"
    )
    assert read_lines(dest / "dev_other.wrd") == ["WORLD OF CATS", "ZEBRA"]
    assert read_lines(dest / "dev_other.ltr") == ["W O R L D | O F | C A T S |", "Z E B R A |"]

    # Counts from the training labels only (Z, B, F of the dev split are not in it).
    expected = collections.Counter()
    for line in read_lines(dest / "train.ltr"):
        expected.update(line.split())
    dict_lines = read_lines(dest / "dict.ltr.txt")
    parsed = [(symbol, int(count)) for symbol, count in (line.split(" ") for line in dict_lines)]
    assert dict(parsed) == dict(expected)
    assert parsed[0] == ("|", 9)
    counts = [count for _, count in parsed]
    assert counts == sorted(counts, reverse=True)
    assert parsed == sorted(parsed, key=lambda item: (-item[1], item[0]))  # deterministic ties


def test_dictionaries_load_in_fairseq(corpus: Path, tmp_path: Path) -> None:
    dictionary_module = pytest.importorskip("fairseq.data.dictionary")
    dest = tmp_path / "data"
    prepare_cli.main(
        [
            str(corpus),
            "--dest",
            str(dest),
            "--split",
            "train=train-clean-100",
            "--units",
            "letter",
            "spm",
            "--spm-vocab",
            "17",
        ]
    )
    letters = dictionary_module.Dictionary.load(str(dest / "dict.ltr.txt"))
    assert letters.index("|") != letters.unk() and letters.index("H") != letters.unk()
    pieces = dictionary_module.Dictionary.load(str(dest / "dict.spm.txt"))
    for line in read_lines(dest / "train.spm"):
        assert all(pieces.index(piece) != pieces.unk() for piece in line.split())


def test_missing_transcript_is_an_error_naming_the_file(corpus: Path, tmp_path: Path) -> None:
    trans_path = corpus / "train-clean-100" / "19" / "198" / "19-198.trans.txt"
    trans_path.write_text("19-198-0000 HELLO WORLD\n", encoding="utf-8")  # drops 19-198-0001
    orphan = corpus / "train-clean-100" / "26" / "495" / "26-495-0000.flac"
    (corpus / "train-clean-100" / "26" / "495" / "26-495.trans.txt").unlink()
    dest = tmp_path / "data"
    with pytest.raises(SystemExit) as raised:
        prepare_cli.main([str(corpus), "--dest", str(dest), "--split", "train=train-clean-100"])
    message = str(raised.value)
    assert "2 of 4 audio files" in message
    assert str(corpus / "train-clean-100" / "19" / "198" / "19-198-0001.flac") in message
    assert str(orphan) in message
    assert "train" in message
    assert not dest.exists()  # nothing written half-way


def test_many_missing_transcripts_are_summarised(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write_librispeech_split(root / "train", [(1, 2, i, "WORD") for i in range(8)])
    (root / "train" / "1" / "2" / "1-2.trans.txt").unlink()
    with pytest.raises(SystemExit) as raised:
        prepare_cli.main([str(root), "--dest", str(tmp_path / "d"), "--split", "train=train"])
    message = str(raised.value)
    assert "8 of 8" in message and "and 3 more" in message
    assert "1-2-0000.flac" in message and "1-2-0007.flac" not in message


def test_unreadable_audio_is_an_error_naming_the_file(corpus: Path, tmp_path: Path) -> None:
    broken = corpus / "dev-other" / "84" / "121" / "84-121-0002.flac"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit) as raised:
        prepare_cli.main(
            [
                str(corpus),
                "--dest",
                str(tmp_path / "d"),
                "--split",
                "train=train-clean-100",
                "--split",
                "dev_other=dev-other",
            ]
        )
    assert str(broken) in str(raised.value) and "dev_other" in str(raised.value)
    assert not (tmp_path / "d").exists()


def test_libri_light_limited_supervision_layout(tmp_path: Path) -> None:
    # librispeech_finetuning/1h/<fold>/<clean|other>/<spk>/<chap>/...
    root = tmp_path / "librispeech_finetuning"
    write_librispeech_split(root / "1h" / "0" / "clean", [(103, 1240, 0, "ONE TWO")])
    write_librispeech_split(root / "1h" / "0" / "other", [(1841, 159, 3, "THREE")])
    write_librispeech_split(root / "1h" / "1" / "clean", [(1069, 133699, 7, "FOUR FIVE")])
    dest = tmp_path / "data"
    prepare_cli.main([str(root), "--dest", str(dest), "--split", "train=1h", "--split", "train_10min=1h/0"])
    assert read_lines(dest / "train.wrd") == ["ONE TWO", "THREE", "FOUR FIVE"]
    assert read_lines(dest / "train_10min.ltr") == ["O N E | T W O |", "T H R E E |"]


def test_resampled_split_keeps_its_transcripts(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write_librispeech_split(root / "train", [(1, 2, 0, "HI THERE"), (1, 2, 1, "BYE")], sample_rate=8000)
    dest = tmp_path / "data"
    with pytest.raises(SystemExit, match="--resample"):
        prepare_cli.main([str(root), "--dest", str(dest), "--split", "train=train"])
    prepare_cli.main([str(root), "--dest", str(dest), "--split", "train=train", "--resample"])
    lines = read_lines(dest / "train.tsv")
    converted_root = Path(lines[0])
    assert converted_root == (dest / "resampled_16000hz" / "train").resolve()
    for line in lines[1:]:
        relative_path, frames = line.split("\t")
        info = soundfile.info(str(converted_root / relative_path))
        assert (info.samplerate, info.frames) == (16000, int(frames))
    assert read_lines(dest / "train.wrd") == ["HI THERE", "BYE"]


def test_sentencepiece_units(corpus: Path, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    prepare_cli.main(
        [
            str(corpus),
            "--dest",
            str(dest),
            "--split",
            "train=train-clean-100",
            "--split",
            "dev=dev-other",
            "--units",
            "spm",
            "--spm-vocab",
            "17",
        ]
    )
    names = sorted(p.name for p in dest.iterdir())
    assert names == [
        "dev.spm",
        "dev.tsv",
        "dev.wrd",
        "dict.spm.txt",
        "spm_unigram17.model",
        "spm_unigram17.vocab",
        "train.spm",
        "train.tsv",
        "train.wrd",
    ]
    # Pieces joined back give the transcript.
    for spm_line, words in zip(read_lines(dest / "train.spm"), read_lines(dest / "train.wrd")):
        assert spm_line.replace(" ", "").replace("\u2581", " ").strip() == words
    dict_lines = read_lines(dest / "dict.spm.txt")
    symbols = [line.split(" ")[0] for line in dict_lines]
    counts = [int(line.split(" ")[1]) for line in dict_lines]
    assert counts == sorted(counts, reverse=True)
    assert not {"<unk>", "<s>", "</s>", "<pad>"} & set(symbols)
    assert len(symbols) == 16  # 17 pieces less <unk>
    used = collections.Counter(piece for line in read_lines(dest / "train.spm") for piece in line.split())
    assert {s: c for s, c in zip(symbols, counts) if c} == dict(used)

    import sentencepiece

    model = sentencepiece.SentencePieceProcessor(model_file=str(dest / "spm_unigram17.model"))
    assert model.get_piece_size() == 17
    assert " ".join(model.encode("HELLO WORLD", out_type=str)) == read_lines(dest / "train.spm")[0]


def test_sentencepiece_vocabulary_too_large_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as raised:
        prepare_cli.main(
            [
                str(corpus),
                "--dest",
                str(tmp_path / "d"),
                "--split",
                "train=train-clean-100",
                "--units",
                "spm",
                "--spm-vocab",
                "5000",
            ]
        )
    assert "--spm-vocab" in str(raised.value)
    assert not (tmp_path / "d").exists()


def test_bad_options_are_clear_errors(corpus: Path, tmp_path: Path) -> None:
    dest = str(tmp_path / "d")
    with pytest.raises(SystemExit, match="--dict-from"):
        prepare_cli.main([str(corpus), "--dest", dest, "--split", "train=train-clean-100", "--dict-from", "dev"])
    with pytest.raises(SystemExit, match="more than once"):
        prepare_cli.main([str(corpus), "--dest", dest, "--split", "a=train-clean-100", "--split", "a=dev-other"])
    with pytest.raises(SystemExit, match="not a folder"):
        prepare_cli.main([str(corpus), "--dest", dest, "--split", "train=train-clean-360"])
    with pytest.raises(SystemExit):  # argparse: NAME=DIR expected
        prepare_cli.main([str(corpus), "--dest", dest, "--split", "train-clean-100"])


# ---- the shipped tiny corpus ----------------------------------------------------------------


def tiny_corpus_transcripts(split: str) -> dict[str, str]:
    transcripts: dict[str, str] = {}
    for trans_path in sorted((TINY_CORPUS / split).glob("*/*/*.trans.txt")):
        for line in read_lines(trans_path):
            utterance, text = line.split(" ", 1)
            transcripts[utterance] = text
    return transcripts


def test_shipped_corpus_fits_the_size_budget() -> None:
    total = sum(p.stat().st_size for p in TINY_CORPUS.rglob("*") if p.is_file())
    assert 0 < total <= MAX_CORPUS_BYTES, f"tiny corpus is {total} bytes"


def test_shipped_corpus_is_in_librispeech_layout() -> None:
    assert sorted(p.name for p in TINY_CORPUS.iterdir() if p.is_dir()) == sorted(TINY_CORPUS_SPLITS)
    name_pattern = re.compile(r"^(\d+)-(\d+)-(\d{4})\.flac$")
    for split in TINY_CORPUS_SPLITS:
        flac_files = sorted((TINY_CORPUS / split).rglob("*.flac"))
        assert flac_files, split
        transcripts = tiny_corpus_transcripts(split)
        assert sorted(p.name[: -len(".flac")] for p in flac_files) == sorted(transcripts)
        for path in flac_files:
            match = name_pattern.match(path.name)
            assert match, path
            speaker, chapter, _ = match.groups()
            assert path.parent.relative_to(TINY_CORPUS / split).parts == (speaker, chapter)
            assert (path.parent / f"{speaker}-{chapter}.trans.txt").is_file()
        for text in transcripts.values():
            assert re.fullmatch(r"[A-Z']+( [A-Z']+){1,5}", text), text  # 2-6 upper-case words


def test_shipped_corpus_audio_is_16k_mono_short_clips() -> None:
    for path in sorted((TINY_CORPUS / "test").rglob("*.flac")):
        info = soundfile.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 0.4 <= info.duration <= 3.5, (path, info.duration)


def test_shipped_corpus_splits_share_vocabulary_not_sentences() -> None:
    sentences = {split: set(tiny_corpus_transcripts(split).values()) for split in TINY_CORPUS_SPLITS}
    counts = {split: len(tiny_corpus_transcripts(split)) for split in TINY_CORPUS_SPLITS}
    assert counts["train"] >= 200 and 40 <= counts["dev"] <= 60 and 40 <= counts["test"] <= 60
    for split in TINY_CORPUS_SPLITS:
        assert len(sentences[split]) == counts[split]  # no sentence twice within a split
    assert not sentences["train"] & sentences["dev"]
    assert not sentences["train"] & sentences["test"]
    assert not sentences["dev"] & sentences["test"]
    train_words = {word for sentence in sentences["train"] for word in sentence.split()}
    for split in ("dev", "test"):
        assert {word for sentence in sentences[split] for word in sentence.split()} <= train_words


def test_prepare_runs_on_the_shipped_corpus(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    prepare_cli.main(
        [
            str(TINY_CORPUS),
            "--dest",
            str(dest),
            "--split",
            "train=train",
            "--split",
            "valid=dev",
            "--split",
            "test=test",
        ]
    )
    for split, name in (("train", "train"), ("dev", "valid"), ("test", "test")):
        transcripts = tiny_corpus_transcripts(split)
        ids = manifest_ids(dest / f"{name}.tsv")
        assert len(ids) == len(transcripts)
        assert read_lines(dest / f"{name}.wrd") == [transcripts[i] for i in ids]
        assert read_lines(dest / f"{name}.ltr") == [letter_labels(transcripts[i]) for i in ids]
    symbols = [line.split(" ")[0] for line in read_lines(dest / "dict.ltr.txt")]
    assert symbols[0] == "|"
    assert set(symbols) == set("ABCDEFGHIJKLMNOPQRSTUVWXYZ'|")


def configured_valid_subset(path: Path) -> str | None:
    """dataset.valid_subset of a shipped config: its own, else that of its defaults."""
    config = yaml.safe_load(path.read_text()) or {}
    subset = (config.get("dataset") or {}).get("valid_subset")
    for default in config.get("defaults") or []:
        parent = path.parent / f"{default}.yaml" if isinstance(default, str) else None
        if subset is None and parent is not None and parent.is_file():
            subset = configured_valid_subset(parent)
    return subset


def test_split_names_are_the_ones_the_shipped_configs_validate_on() -> None:
    """CONFIG_VALIDATION_SPLITS, the note's source, against every speech config's yaml
    (fairseq's default when none sets it: 'valid')."""
    found = collections.defaultdict(list)
    for folder in ("pretraining", "finetuning"):
        for path in sorted((REPO_ROOT / "configs" / folder).glob("*.yaml")):
            found[configured_valid_subset(path) or "valid"].append(f"{folder}/{path.stem}")
    assert set(found) == set(prepare_cli.CONFIG_VALIDATION_SPLITS)
    assert [name for name in found["dev_other"]] == [
        f"finetuning/base_{s}" for s in ("100h", "10h", "10m", "1h", "960h")
    ]
    assert "finetuning/tiny" in found["valid"] and all(
        name.startswith("pretraining/") or name == "finetuning/tiny" for name in found["valid"]
    )


def test_data_no_config_validates_on_gets_a_note(tmp_path: Path, capsys) -> None:
    dest = tmp_path / "data"
    prepare_cli.main(
        [str(TINY_CORPUS), "--dest", str(dest), "--split", "train=train", "--split", "dev=dev", "--no-progress"]
    )
    err = capsys.readouterr().err
    assert err.rstrip().endswith(
        "configs/finetuning/base_*); train with dataset.valid_subset=dev, or prepare with --split valid=DIR"
    )
    assert prepare_cli.validation_split_note(["train", "valid", "test"]) is None
    assert prepare_cli.validation_split_note(["train", "dev_other"]) is None


def test_transcript_that_is_not_utf8_is_named_with_its_line(corpus: Path, tmp_path: Path) -> None:
    trans = corpus / "dev-other" / "84" / "121" / "84-121.trans.txt"
    trans.write_bytes("84-121-0000 WORLD OF CATS\n84-121-0001 Z\xc8BRA\n".encode("latin-1"))
    with pytest.raises(SystemExit) as raised:
        prepare_cli.main(
            [
                str(corpus),
                "--dest",
                str(tmp_path / "d"),
                "--split",
                "train=train-clean-100",
                "--split",
                "dev_other=dev-other",
                "--no-progress",
            ]
        )
    assert str(raised.value) == (
        f"knnvq-prepare-librispeech: error: {trans} line 2 is not UTF-8 text (byte 0xc8 at column 14); "
        "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 (with its real encoding)"
    )
    assert not (tmp_path / "d").exists()
