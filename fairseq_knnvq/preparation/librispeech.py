"""Transcripts of a corpus in LibriSpeech's layout as fairseq fine-tuning labels: the work
of ``knnvq-prepare-librispeech`` (:mod:`fairseq_knnvq.cli.prepare_librispeech`).

Each audio folder ``<speaker>/<chapter>/`` holds a ``<speaker>-<chapter>.trans.txt`` with
lines ``<utterance-id> TRANSCRIPT``; :func:`attach_transcripts` pairs every manifest
entry with its transcript. The labels are letters separated by spaces with ``|``
between words and at the end, exactly as fairseq's ``examples/wav2vec/libri_labels.py``
(:func:`letter_labels`), or the pieces of a unigram sentencepiece model trained offline
on the training transcripts (:func:`train_sentencepiece`); :func:`dictionary_text` is
fairseq's ``Dictionary`` file of them. Nothing here imports fairseq.
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .manifest import AudioEntry, Manifest, ManifestError

# Shown in error messages before "... and N more".
MAX_LISTED_MISSING = 5
WORD_BOUNDARY = "|"


class PreparationError(ManifestError):
    """A problem with the corpus or the options that the user has to fix."""


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    """A split's manifest and the transcript of each of its entries, in the same order."""

    name: str
    manifest: Manifest
    transcripts: tuple[str, ...]


def letter_labels(transcript: str) -> str:
    """``"HELLO WORLD"`` -> ``"H E L L O | W O R L D |"``, as fairseq's libri_labels.py."""
    return " ".join(transcript.replace(" ", WORD_BOUNDARY)) + " " + WORD_BOUNDARY


def utterance_id(audio_path: Path) -> str:
    """LibriSpeech utterance id of an audio file: its name up to the first dot."""
    return audio_path.name.split(".")[0]


def read_transcripts(folder: Path) -> dict[str, str]:
    """All ``*.trans.txt`` lines of one folder as ``{utterance_id: transcript}``.

    LibriSpeech names the file ``<speaker>-<chapter>.trans.txt``; every such file in
    the folder is read, so a differently named chapter file works too. Whitespace
    inside a transcript is normalised to single spaces.
    """
    transcripts: dict[str, str] = {}
    for trans_path in sorted(folder.glob("*.trans.txt")):
        with open(trans_path, "rb") as trans_file:
            for number, raw_line in enumerate(trans_file, start=1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise PreparationError(
                        f"{trans_path} line {number} is not UTF-8 text (byte {raw_line[error.start]:#04x} "
                        f"at column {error.start + 1}); convert the file to UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 (with its real encoding)"
                    ) from None
                fields = line.split()
                if fields:
                    transcripts[fields[0]] = " ".join(fields[1:])
    return transcripts


def attach_transcripts(name: str, manifest: Manifest) -> LabelledSplit:
    """Pair every manifest entry with its transcript, or stop naming the missing ones."""
    cache: dict[Path, dict[str, str]] = {}
    transcripts: list[str] = []
    missing: list[AudioEntry] = []
    for entry in manifest.entries:
        # The transcript sits next to the original audio (not next to a resampled copy).
        folder = entry.source_path.parent
        if folder not in cache:
            cache[folder] = read_transcripts(folder)
        text = cache[folder].get(utterance_id(entry.source_path), "")
        if not text:
            missing.append(entry)
        transcripts.append(text)
    if missing:
        shown = ", ".join(str(entry.source_path) for entry in missing[:MAX_LISTED_MISSING])
        more = f" ... and {len(missing) - MAX_LISTED_MISSING} more" if len(missing) > MAX_LISTED_MISSING else ""
        raise PreparationError(
            f"split {name!r}: {len(missing)} of {len(manifest.entries)} audio files have no (or an empty) "
            f"transcript: {shown}{more}. Each audio folder needs a <speaker>-<chapter>.trans.txt "
            "with a line '<utterance-id> TRANSCRIPT' for each of its audio files."
        )
    return LabelledSplit(name=name, manifest=manifest, transcripts=tuple(transcripts))


def count_symbols(label_lines: Iterable[str]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in label_lines:
        counts.update(line.split())
    return counts


def dictionary_text(counts: Mapping[str, int], order: Sequence[str] | None = None) -> str:
    """fairseq ``Dictionary`` file: ``<symbol> <count>`` lines, most frequent first.

    Ties are broken by ``order`` when given (e.g. sentencepiece ids), else by symbol,
    so the file is deterministic.
    """
    rank = {symbol: i for i, symbol in enumerate(order)} if order is not None else None
    symbols = list(order) if order is not None else list(counts)
    key = (lambda s: (-counts.get(s, 0), rank[s])) if rank is not None else (lambda s: (-counts.get(s, 0), s))
    return "".join(f"{symbol} {counts.get(symbol, 0)}\n" for symbol in sorted(symbols, key=key))


@dataclasses.dataclass(frozen=True)
class SentencePieceUnits:
    """A trained sentencepiece model: its files (bytes) and a text -> pieces encoder."""

    model_bytes: bytes
    vocab_text: str
    pieces: tuple[str, ...]  # ordinary pieces in id order (no <unk> or control symbols)
    processor: object  # sentencepiece.SentencePieceProcessor

    def encode(self, transcript: str) -> str:
        return " ".join(self.processor.encode(transcript, out_type=str))  # type: ignore[attr-defined]


def train_sentencepiece(transcripts: Sequence[str], vocab_size: int) -> SentencePieceUnits:
    """Train a unigram sentencepiece model on ``transcripts`` (in a temporary folder)."""
    import sentencepiece

    with tempfile.TemporaryDirectory(prefix="knnvq-spm-") as work_dir:
        prefix = Path(work_dir, "spm")
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(transcripts),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type="unigram",
                # Letters of a transcript are all wanted; none may become <unk>.
                character_coverage=1.0,
                # fairseq's Dictionary adds <s>, <pad>, </s>, <unk> itself.
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                unk_id=0,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise PreparationError(
                f"sentencepiece could not train a {vocab_size}-piece model on the training "
                f"transcripts ({error}). Choose another --spm-vocab: at least one piece per "
                "character of the transcripts plus <unk>, and at most what they support"
            ) from None
        processor = sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")
        pieces = tuple(
            processor.id_to_piece(i)
            for i in range(processor.get_piece_size())
            if not (processor.is_unknown(i) or processor.is_control(i) or processor.is_unused(i))
        )
        return SentencePieceUnits(
            model_bytes=Path(f"{prefix}.model").read_bytes(),
            vocab_text=Path(f"{prefix}.vocab").read_text(encoding="utf-8"),
            pieces=pieces,
            processor=processor,
        )
