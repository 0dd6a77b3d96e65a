"""fairseq's audio manifest (``{data}/{split}.tsv``), read and written in one place.

The format is what fairseq's ``FileAudioDataset`` reads and its
``examples/wav2vec/wav2vec_manifest.py`` writes::

    /absolute/root
    relative/path/to/file.flac<TAB>num_frames
    ...

:func:`build_manifest` finds and checks the audio files under a folder (every file
decoded to its end, in parallel; mono at the sample rate, else an error naming the
files, or a converted copy with ``resample_dir``) and describes them as a
:class:`Manifest`; :func:`split_train_valid` draws fairseq's seeded train/valid split.
``knnvq-manifest`` and ``knnvq-prepare-librispeech`` write it (:meth:`Manifest.to_text`),
``knnvq-infer`` and ``knnvq-report codes`` read it (:func:`read_manifest`). Nothing
here imports fairseq or torchaudio: audio I/O is ``soundfile``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import soundfile

from ..files import atomic_path

FORMAT = "line 1 the audio root, then 'relative/path<TAB>num_frames' lines"
DEFAULT_SAMPLE_RATE = 16000
# Frames decoded per read while checking a file (64k frames = 4 s at 16 kHz, 128 KiB).
DECODE_BLOCK_FRAMES = 1 << 16
# soundfile subtypes of floating-point samples, the only ones that can hold NaN or inf.
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
# Below this many files the check runs in the calling thread.
CHECK_CHUNK_SIZE = 16
# How many problem files an error message lists before it says "... and N more".
MAX_LISTED_PROBLEMS = 10
# What soundfile raises for a file it cannot read (SoundFileError is new in 0.11).
_SOUNDFILE_READ_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, OSError, ValueError) + (
    (soundfile.SoundFileError,) if hasattr(soundfile, "SoundFileError") else ()
)


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


@dataclasses.dataclass(frozen=True)
class _AudioCheck:
    """What ``soundfile.info`` says about one file, or why it could not say."""

    path: Path
    num_frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    read_error: str | None = None

    def needs_conversion(self, sample_rate: int) -> bool:
        return self.read_error is None and (self.sample_rate != sample_rate or self.channels != 1)

    def describe_mismatch(self, sample_rate: int) -> str:
        reasons = []
        if self.sample_rate != sample_rate:
            reasons.append(f"sample rate {self.sample_rate} Hz, expected {sample_rate} Hz")
        if self.channels != 1:
            reasons.append(f"{self.channels} channels, expected 1 (mono)")
        return "; ".join(reasons)


def parse_extensions(extensions: str | Iterable[str]) -> tuple[str, ...]:
    """``"flac"``, ``"flac,wav"`` or ``["flac", ".wav"]`` -> ``(".flac", ".wav")``."""
    if isinstance(extensions, str):
        extensions = extensions.split(",")
    parsed = tuple(sorted({"." + ext.strip().lstrip(".").lower() for ext in extensions if ext.strip()}))
    if not parsed:
        raise ManifestError("no audio extension given (e.g. --ext flac)")
    return parsed


def find_audio_files(
    root: Path,
    extensions: str | Iterable[str] = "flac",
    path_must_contain: str | None = None,
    exclude_dirs: Iterable[Path] = (),
) -> list[Path]:
    """All audio files under ``root`` with one of ``extensions``, sorted.

    Hidden files and folders (names starting with ".") are skipped: they are
    temporary or staging files, e.g. a half-written ``.x.partial.flac``. Symlinked
    folders are followed (once each). Folders in ``exclude_dirs`` below ``root`` are
    skipped (our own converted copies when ``--dest`` is inside ``root``).
    ``path_must_contain`` keeps only files whose absolute path contains that text, as
    in fairseq's script.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder")
    suffixes = parse_extensions(extensions)
    excluded = {Path(d).resolve() for d in exclude_dirs}
    visited: set[Path] = set()
    found: list[Path] = []
    for dir_path, dir_names, file_names in os.walk(root, followlinks=True):
        real_dir = Path(dir_path).resolve()
        if real_dir in visited or (real_dir in excluded and real_dir != root):
            dir_names[:] = []  # a symlink loop, or our own output folder
            continue
        visited.add(real_dir)
        dir_names[:] = [name for name in dir_names if not name.startswith(".")]
        for file_name in file_names:
            if file_name.startswith(".") or not file_name.lower().endswith(suffixes):
                continue
            path = Path(dir_path, file_name)
            if path_must_contain and path_must_contain not in str(path):
                continue
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _check_audio_file(path: Path) -> _AudioCheck:
    """Reads the header of ``path`` and then decodes the whole file.

    Reading only the header (``soundfile.info``) accepts a truncated FLAC, whose header
    still promises every frame; fairseq then fails on it in the middle of training. A
    file whose decoding fails, ends before the frame count of its header, or (a float
    WAV) holds a NaN or inf sample, is reported with a ``read_error``.
    """
    import numpy as np

    try:
        with soundfile.SoundFile(str(path)) as audio:
            num_frames, sample_rate, channels = int(audio.frames), int(audio.samplerate), int(audio.channels)
            # Only floating-point files can hold NaN or inf (integer PCM cannot), and
            # decoding those to int16 would hide them.
            floating = audio.subtype in FLOAT_SUBTYPES
            decoded = 0
            for block in audio.blocks(
                blocksize=DECODE_BLOCK_FRAMES, dtype="float32" if floating else "int16", always_2d=True
            ):
                if floating and not np.isfinite(block).all():
                    bad = decoded + int(np.argmin(np.isfinite(block).all(axis=1)))
                    return _AudioCheck(
                        path=path,
                        read_error=f"holds non-finite samples (NaN or inf), the first at frame {bad}; "
                        f"training on it makes every loss NaN",
                    )
                decoded += block.shape[0]
    except _SOUNDFILE_READ_ERRORS as error:
        reason = str(error).strip() or type(error).__name__
        return _AudioCheck(path=path, read_error=f"does not decode ({reason})")
    if decoded != num_frames:
        return _AudioCheck(
            path=path,
            read_error=f"decodes to {decoded} frames, but its header says {num_frames} (truncated?)",
        )
    return _AudioCheck(path=path, num_frames=num_frames, sample_rate=sample_rate, channels=channels)


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_audio_files(paths: Sequence[Path], workers: int | None = None, progress: bool = False) -> list[_AudioCheck]:
    """:func:`_check_audio_file` for every path, in order, over ``workers`` threads
    (default: every CPU), with a progress bar on stderr when ``progress`` is set.

    Threads, not processes: libsndfile decodes outside the GIL (soundfile calls it
    through cffi), so threads use every CPU, and nothing is forked. A forked pool
    deadlocks now and then when the caller already runs threads (torch's, a test
    runner's), and needs POSIX semaphores that some containers lack.
    """
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ManifestError(f"--workers must be at least 1, got {workers}")
    bar = tqdm(total=len(paths), unit="file", desc="decoding audio", disable=not progress, file=sys.stderr)
    checks: list[_AudioCheck] = []
    try:
        if workers == 1 or len(paths) <= CHECK_CHUNK_SIZE:
            for path in paths:
                checks.append(_check_audio_file(path))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
                for check in pool.map(_check_audio_file, paths):  # in the order of ``paths``
                    checks.append(check)
                    bar.update()
    finally:
        bar.close()
    return checks


def list_problems(lines: Sequence[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:MAX_LISTED_PROBLEMS])
    if len(lines) > MAX_LISTED_PROBLEMS:
        shown += f"\n  ... and {len(lines) - MAX_LISTED_PROBLEMS} more"
    return shown


def resample_audio_file(source: Path, destination: Path, sample_rate: int) -> int:
    """Write ``source`` as ``sample_rate`` Hz mono 16-bit PCM to ``destination``.

    Channels are averaged, then resampled with a polyphase filter. The format follows
    ``destination``'s extension (FLAC, WAV, ...). Written atomically. Returns the
    number of frames written: ``ceil(frames * sample_rate / source_rate)``.
    """
    # Lazily: scipy is only needed for the (rare) conversion path and is slow to import.
    from scipy.signal import resample_poly
    import numpy as np

    audio, source_rate = soundfile.read(str(source), dtype="float64", always_2d=True)
    mono = audio.mean(axis=1)
    if source_rate != sample_rate:
        common = math.gcd(sample_rate, source_rate)
        mono = resample_poly(mono, sample_rate // common, source_rate // common)
    # The anti-aliasing filter can overshoot full scale a little; clip instead of wrap.
    mono = np.clip(mono, -1.0, 1.0)
    output_format = destination.suffix.lstrip(".").upper()  # "FLAC", "WAV", ...
    with atomic_path(destination) as partial:
        soundfile.write(str(partial), mono, sample_rate, subtype="PCM_16", format=output_format)
    return int(mono.shape[0])


def _link_or_copy(source: Path, destination: Path) -> None:
    """Make ``destination`` a symlink to ``source`` (a copy where links are not allowed)."""
    with atomic_path(destination) as partial:
        partial.unlink()  # os.symlink makes the name itself
        try:
            os.symlink(source.resolve(), partial)
        except OSError:
            shutil.copyfile(source, partial)


def build_manifest(
    root: Path,
    extensions: str | Iterable[str] = "flac",
    path_must_contain: str | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    resample_dir: Path | None = None,
    exclude_dirs: Iterable[Path] = (),
    workers: int | None = None,
    progress: bool = False,
) -> Manifest:
    """Find and check the audio files under ``root`` and describe them as a manifest.

    Every file must decode to its end with finite samples (checked over ``workers`` processes, see
    :func:`check_audio_files`), be mono and at ``sample_rate``. Files that are readable
    but at another rate or with several channels are an error unless ``resample_dir``
    is given; then they are converted into ``resample_dir`` (which mirrors ``root``'s
    folder tree), the other files are linked there, and the manifest's root is
    ``resample_dir``. Nothing is converted when all files already fit.

    Raises ``ManifestError`` naming the offending files and the fix.
    """
    root = Path(root).resolve()
    excluded = list(exclude_dirs) + ([resample_dir] if resample_dir is not None else [])
    paths = find_audio_files(root, extensions, path_must_contain, exclude_dirs=excluded)
    if not paths:
        filter_note = f" whose path contains {path_must_contain!r}" if path_must_contain else ""
        raise ManifestError(
            f"no audio files with extension {', '.join(parse_extensions(extensions))}{filter_note} "
            f"found under {root} (hidden files are skipped; choose the extension with --ext)"
        )

    checks = check_audio_files(paths, workers=workers, progress=progress)
    unreadable = [c for c in checks if c.read_error is not None]
    if unreadable:
        raise ManifestError(
            f"{len(unreadable)} of {len(checks)} audio files cannot be read:\n"
            + list_problems([f"{c.path}: {c.read_error}" for c in unreadable])
            + "\nReplace them with intact copies (e.g. download or extract them again), delete "
            "them, or leave them out with --path-must-contain / --ext. Nothing was written."
        )
    mismatched = [c for c in checks if c.needs_conversion(sample_rate)]
    if mismatched and resample_dir is None:
        raise ManifestError(
            f"{len(mismatched)} of {len(checks)} audio files are not {sample_rate} Hz mono:\n"
            + list_problems([f"{c.path}: {c.describe_mismatch(sample_rate)}" for c in mismatched])
            + f"\nPass --resample to convert them to {sample_rate} Hz mono 16-bit copies under "
            "--dest (the manifest then points at those), or convert them yourself."
        )

    if not mismatched:
        entries = tuple(AudioEntry(c.path.relative_to(root).as_posix(), c.num_frames, c.path) for c in checks)
        return Manifest(root=root, entries=entries)

    assert resample_dir is not None
    mirror_root = Path(resample_dir).resolve()
    converted_entries = []
    for check in checks:
        relative = check.path.relative_to(root)
        target = mirror_root / relative
        if check.needs_conversion(sample_rate):
            if not soundfile.check_format(target.suffix.lstrip(".").upper(), "PCM_16"):
                target = target.with_suffix(".flac")  # e.g. OGG has no 16-bit PCM
            num_frames = resample_audio_file(check.path, target, sample_rate)
        else:
            _link_or_copy(check.path, target)
            num_frames = check.num_frames
        converted_entries.append(AudioEntry(target.relative_to(mirror_root).as_posix(), num_frames, check.path))
    print(
        f"converted {len(mismatched)} of {len(checks)} files to {sample_rate} Hz mono under {mirror_root}",
        file=sys.stderr,
    )
    return Manifest(root=mirror_root, entries=tuple(converted_entries))


def split_train_valid(manifest: Manifest, valid_percent: float, seed: int) -> tuple[Manifest, Manifest]:
    """Seeded random train/valid split, drawn as fairseq's ``wav2vec_manifest.py`` does.

    One ``random.Random(seed).random()`` draw per file in manifest order; a file goes
    to valid when the draw is ``<= valid_percent``.
    """
    if not 0.0 <= valid_percent <= 1.0:
        raise ManifestError(f"--valid-percent must be between 0 and 1, got {valid_percent}")
    rand = random.Random(seed)
    train: list[AudioEntry] = []
    valid: list[AudioEntry] = []
    for entry in manifest.entries:
        (train if rand.random() > valid_percent else valid).append(entry)
    return Manifest(manifest.root, tuple(train)), Manifest(manifest.root, tuple(valid))


# The split that must share no audio with any other manifest of its folder.
TRAIN_SPLIT = "train"


def stale_manifest_problems(dest: Path, new: Mapping[str, Manifest]) -> list[str]:
    """Manifests already in ``dest`` that this run does not rewrite but that share audio
    files with a new manifest, where one of the two is the training split
    (``train.tsv``, fairseq's default ``dataset.train_subset``): left from an earlier run
    (e.g. an old ``valid.tsv`` after a run without a valid split), they would validate
    on training audio. Other overlaps (``all.tsv`` and a subset) are allowed."""
    new_files = {name: {m.root / e.relative_path for e in m.entries} for name, m in new.items()}
    problems = []
    for path in sorted(Path(dest).glob("*.tsv")):
        if path.stem in new:
            continue
        try:
            old = read_manifest(path)
        except (OSError, ManifestError):
            continue  # not a manifest
        old_files = {old.root / e.relative_path for e in old.entries}
        for name, files in new_files.items():
            if TRAIN_SPLIT not in (name, path.stem):
                continue
            shared = len(old_files & files)
            if shared:
                problems.append(f"{path} lists {shared} audio files that the new {name}.tsv also lists")
    return problems
