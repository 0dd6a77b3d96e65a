"""fairseq's audio manifest (``{data}/{split}.tsv``), read and written in one place.

The format is what fairseq's ``FileAudioDataset`` reads and its
``examples/wav2vec/wav2vec_manifest.py`` writes::

    /absolute/root
    relative/path/to/file.flac<TAB>num_frames
    ...

``knnvq-manifest`` and ``knnvq-prepare-librispeech`` write it (:meth:`Manifest.to_text`),
``knnvq-infer`` and ``knnvq-report codes`` read it (:func:`read_manifest`). Nothing
here imports fairseq.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

FORMAT = "line 1 the audio root, then 'relative/path<TAB>num_frames' lines"


class ManifestError(Exception):
    """A problem with the input that the user has to fix; the message says how."""


@dataclasses.dataclass(frozen=True)
class AudioEntry:
    """One line of a manifest.

    ``relative_path`` is relative to the manifest root (POSIX separators, as fairseq
    joins it with ``os.path.join``); ``source_path`` is the original file, which
    differs from ``root / relative_path`` only when the file was resampled. Callers
    that look for files next to the audio (LibriSpeech transcripts) use it.
    """

    relative_path: str
    num_frames: int
    source_path: Path


@dataclasses.dataclass(frozen=True)
class Manifest:
    """An absolute root folder and the audio files under it, in manifest order."""

    root: Path
    entries: tuple[AudioEntry, ...]

    def to_text(self) -> str:
        lines = [f"{self.root}\n"]
        lines += [f"{entry.relative_path}\t{entry.num_frames}\n" for entry in self.entries]
        return "".join(lines)

    @property
    def total_frames(self) -> int:
        return sum(entry.num_frames for entry in self.entries)


def read_manifest(path: Path) -> Manifest:
    """The manifest in ``path`` (written by ``knnvq-manifest`` or by fairseq's script);
    blank lines are skipped. ManifestError when the file is missing, empty, not UTF-8 or
    has a line that is not ``relative/path<TAB>num_frames``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist: write one with knnvq-manifest")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(f"manifest {path} is not a fairseq manifest ({FORMAT}): not UTF-8 text ({error})") from None
    if not text:
        raise ManifestError(f"manifest {path} is not a fairseq manifest ({FORMAT}): the file is empty")
    lines = text.split("\n")
    root = Path(lines[0].strip())
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise ManifestError(f"manifest {path} is not a fairseq manifest ({FORMAT}): line {number} is {line!r}")
        entries.append(AudioEntry(fields[0], int(fields[1]), root / fields[0]))
    return Manifest(root, tuple(entries))
