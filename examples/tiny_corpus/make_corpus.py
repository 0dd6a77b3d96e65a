#!/usr/bin/env python3
"""Synthesise a tiny English speech corpus in LibriSpeech's layout, offline.

The corpus exists so that the whole pipeline (wav2vec 2.0 pretraining, CTC letter
fine-tuning, WER) can run end to end on a CPU in minutes, in tests and in the demo.
Speech comes from espeak-ng (a formant synthesiser: several voices, variants, speeds
and pitches), and sox turns it into 16 kHz mono 16-bit FLAC with the leading and
trailing silence trimmed. Sentences are 2-6 words drawn with a seeded RNG from a
fixed word list, so the vocabulary is tiny and every word is seen many times in
training; the train, dev and test splits use disjoint sentences over that same
vocabulary.

Output layout (the same as LibriSpeech, so the real-data tools read it unchanged):

    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac
    <out>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <out>/SPEAKERS.TXT

A "speaker" is one voice configuration (espeak-ng voice + variant, speed, pitch);
each split has its own chapter number, so utterance ids are unique corpus-wide.

The corpus is built in a staging folder next to ``--out`` and moved into place only
when complete, so an interrupted run never leaves a half-written corpus behind.

Needs the Debian packages espeak-ng and sox (``apt-get install espeak-ng sox``)
and nothing beyond the Python standard library. Output is deterministic for a given
``--seed`` and set of tool versions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

# Common words that are acoustically distinct from each other (no homophones such
# as TWO/TO or FOUR/FOR) and together cover all 26 letters plus the apostrophe,
# which LibriSpeech transcripts also contain.
WORDS: tuple[str, ...] = (
    "YES",
    "NO",
    "UP",
    "DOWN",
    "LEFT",
    "RIGHT",
    "ON",
    "OFF",
    "STOP",
    "GO",
    "ZERO",
    "ONE",
    "TWO",
    "THREE",
    "FIVE",
    "SIX",
    "SEVEN",
    "EIGHT",
    "NINE",
    "RED",
    "GREEN",
    "BLUE",
    "BLACK",
    "WHITE",
    "DOG",
    "CAT",
    "FISH",
    "BIRD",
    "HORSE",
    "BOX",
    "BIG",
    "SMALL",
    "HOT",
    "COLD",
    "QUICK",
    "JUMP",
    "VERY",
    "KING",
    "WATER",
    "HOUSE",
    "DON'T",
)


@dataclasses.dataclass(frozen=True)
class VoiceConfig:
    """One synthetic "speaker": an espeak-ng voice and variant at a speed and pitch."""

    speaker_id: int
    voice: str  # espeak-ng voice name, e.g. "en-us"
    variant: str  # espeak-ng variant, e.g. "m1" (male 1) or "f2" (female 2)
    speed_wpm: int  # espeak-ng -s, words per minute
    pitch: int  # espeak-ng -p, 0-99

    @property
    def sex(self) -> str:
        return "F" if self.variant.startswith("f") else "M"

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}"


# Speaker ids are LibriSpeech-like small integers; the set is fixed so that speaker
# ids mean the same voice in every corpus this script makes.
VOICES: tuple[VoiceConfig, ...] = (
    VoiceConfig(101, "en-us", "m1", 175, 45),
    VoiceConfig(102, "en-us", "f2", 165, 60),
    VoiceConfig(103, "en-gb", "m3", 185, 40),
    VoiceConfig(104, "en-gb", "f1", 170, 65),
    VoiceConfig(105, "en-us", "m4", 195, 35),
    VoiceConfig(106, "en-gb-scotland", "m2", 180, 50),
    VoiceConfig(107, "en-029", "f3", 160, 70),
    VoiceConfig(108, "en-us", "f4", 190, 55),
)

# One chapter number per split keeps "<speaker>-<chapter>-<utt>" unique corpus-wide.
CHAPTER_OF_SPLIT: dict[str, int] = {"train": 1001, "dev": 2001, "test": 3001}

REQUIRED_TOOLS: tuple[str, ...] = ("espeak-ng", "sox")


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One clip to synthesise: where it goes, what it says, and how it is spoken."""

    split: str
    voice: VoiceConfig
    chapter_id: int
    index: int  # position within (speaker, chapter)
    text: str  # upper-case transcript, words separated by single spaces
    speed_wpm: int  # voice speed with a small per-utterance jitter
    pitch: int  # voice pitch with a small per-utterance jitter
    gain: float  # linear gain applied by sox

    @property
    def utterance_id(self) -> str:
        return f"{self.voice.speaker_id}-{self.chapter_id}-{self.index:04d}"

    def relative_dir(self) -> Path:
        return Path(self.split, str(self.voice.speaker_id), str(self.chapter_id))


def check_tools() -> None:
    """Stop with an actionable message when the synthesis tools are not installed."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"make_corpus.py: {', '.join(missing)} not found on PATH. The corpus is "
            "synthesised offline with espeak-ng and sox; install them with "
            "`apt-get install espeak-ng sox` (Debian/Ubuntu) and run again. "
            "(Tests do not need them: the generated corpus is shipped.)"
        )


def draw_sentences(rng: random.Random, count: int, min_words: int, max_words: int, words: Sequence[str]) -> list[str]:
    """Draw ``count`` distinct sentences of ``min_words``-``max_words`` words.

    Words inside one sentence may repeat; sentences never do, which is what lets the
    caller hand out disjoint sets of sentences to the splits.
    """
    possible = sum(len(words) ** n for n in range(min_words, max_words + 1))
    if count > possible:
        raise SystemExit(f"only {possible} distinct sentences exist; asked for {count}")
    sentences: list[str] = []
    seen: set[str] = set()
    while len(sentences) < count:
        length = rng.randint(min_words, max_words)
        sentence = " ".join(rng.choice(words) for _ in range(length))
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def plan_split(
    rng: random.Random, split: str, sentences: Sequence[str], voices: Sequence[VoiceConfig]
) -> list[Utterance]:
    """Give each sentence of a split to one voice, balanced over voices."""
    chapter_id = CHAPTER_OF_SPLIT[split]
    # Cycling through a shuffled voice order gives every voice the same share (+-1).
    voice_order = list(voices)
    rng.shuffle(voice_order)
    next_index: dict[int, int] = {}
    utterances: list[Utterance] = []
    for position, text in enumerate(sentences):
        voice = voice_order[position % len(voice_order)]
        index = next_index.get(voice.speaker_id, 0)
        next_index[voice.speaker_id] = index + 1
        utterances.append(
            Utterance(
                split=split,
                voice=voice,
                chapter_id=chapter_id,
                index=index,
                text=text,
                # Small jitter so that one speaker is not one fixed rate and pitch.
                speed_wpm=voice.speed_wpm + rng.randint(-10, 10),
                pitch=min(99, max(0, voice.pitch + rng.randint(-5, 5))),
                # About -7 dB to -10 dB: a LibriSpeech-like level, and quieter
                # samples also make the FLAC files smaller.
                gain=round(rng.uniform(0.3, 0.45), 3),
            )
        )
    return utterances


def synthesise(utterance: Utterance, corpus_root: Path, trim_threshold: str) -> None:
    """Write one utterance's FLAC file (atomically: temporary name, then rename)."""
    out_dir = corpus_root / utterance.relative_dir()
    final_path = out_dir / f"{utterance.utterance_id}.flac"
    with tempfile.TemporaryDirectory(prefix="espeak-") as work_dir:
        raw_wav = Path(work_dir, "raw.wav")
        # espeak-ng reads all-caps words as acronyms sometimes, so it gets lower case.
        subprocess.run(
            [
                "espeak-ng",
                "-v",
                utterance.voice.espeak_voice,
                "-s",
                str(utterance.speed_wpm),
                "-p",
                str(utterance.pitch),
                "-w",
                str(raw_wav),
                utterance.text.lower(),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        partial_path = out_dir / f".{utterance.utterance_id}.partial.flac"
        # -R: repeatable (no random seed), -D: no dither. Dither would add noise that
        # both changes every run and costs FLAC compression.
        trim = ["silence", "1", "0.02", trim_threshold]
        subprocess.run(
            [
                "sox",
                "-R",
                "-D",
                str(raw_wav),
                "-r",
                "16000",
                "-c",
                "1",
                "-b",
                "16",
                "-C",
                "8",
                str(partial_path),
                "vol",
                str(utterance.gain),
                # Trim leading silence, then trailing (by trimming the reversed signal).
                *trim,
                "reverse",
                *trim,
                "reverse",
                # Keep a short pause at both ends, as in read speech.
                "pad",
                "0.1",
                "0.1",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.replace(partial_path, final_path)


def write_text_atomically(path: Path, text: str) -> None:
    partial_path = path.with_name(f".{path.name}.partial")
    partial_path.write_text(text, encoding="utf-8")
    os.replace(partial_path, path)


def write_transcripts(corpus_root: Path, utterances: Sequence[Utterance]) -> None:
    """Write one ``<speaker>-<chapter>.trans.txt`` per chapter folder, as LibriSpeech."""
    by_dir: dict[Path, list[Utterance]] = {}
    for utterance in utterances:
        by_dir.setdefault(utterance.relative_dir(), []).append(utterance)
    for relative_dir, chapter_utterances in by_dir.items():
        first = chapter_utterances[0]
        name = f"{first.voice.speaker_id}-{first.chapter_id}.trans.txt"
        lines = [f"{u.utterance_id} {u.text}\n" for u in sorted(chapter_utterances, key=lambda u: u.index)]
        write_text_atomically(corpus_root / relative_dir / name, "".join(lines))


def write_speakers_file(corpus_root: Path, voices: Sequence[VoiceConfig], splits: Sequence[str]) -> None:
    """SPEAKERS.TXT, like LibriSpeech's, naming the voice configuration of each id."""
    lines = [
        "; Synthetic speakers of the tiny corpus: one espeak-ng voice configuration each.\n",
        "; Per-utterance speed and pitch jitter by up to +-10 wpm and +-5.\n",
        ";ID  |SEX| SUBSETS          | ESPEAK VOICE         | SPEED | PITCH\n",
    ]
    subsets = ",".join(splits)
    for voice in voices:
        lines.append(
            f"{voice.speaker_id:<4} | {voice.sex} | {subsets:<16} | {voice.espeak_voice:<20} "
            f"| {voice.speed_wpm:>5} | {voice.pitch:>5}\n"
        )
    write_text_atomically(corpus_root / "SPEAKERS.TXT", "".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "LibriSpeech",
        help="corpus root to create (replaced only with --overwrite)",
    )
    parser.add_argument("--num-train", type=int, default=220, help="training utterances")
    parser.add_argument("--num-dev", type=int, default=40, help="dev utterances")
    parser.add_argument("--num-test", type=int, default=40, help="test utterances")
    parser.add_argument("--min-words", type=int, default=2, help="shortest sentence, in words")
    parser.add_argument("--max-words", type=int, default=6, help="longest sentence, in words")
    parser.add_argument(
        "--num-speakers",
        type=int,
        default=len(VOICES),
        help=f"how many of the {len(VOICES)} voice configurations to use",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of sentences, voices and jitter")
    parser.add_argument(
        "--trim-threshold",
        default="0.3%",
        help="sox 'silence' level below which leading/trailing audio counts as silence",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel synthesis jobs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    if not 1 <= args.min_words <= args.max_words:
        parser.error("need 1 <= --min-words <= --max-words")
    if not 1 <= args.num_speakers <= len(VOICES):
        parser.error(f"--num-speakers must be between 1 and {len(VOICES)}")
    if min(args.num_train, args.num_dev, args.num_test) < 1:
        parser.error("every split needs at least one utterance")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_tools()
    out: Path = args.out.resolve()
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")

    rng = random.Random(args.seed)
    split_sizes = {"train": args.num_train, "dev": args.num_dev, "test": args.num_test}
    sentences = draw_sentences(rng, sum(split_sizes.values()), args.min_words, args.max_words, WORDS)
    voices = VOICES[: args.num_speakers]

    # Consecutive slices of one list of distinct sentences: disjoint by construction.
    utterances: list[Utterance] = []
    start = 0
    for split, size in split_sizes.items():
        utterances += plan_split(rng, split, sentences[start : start + size], voices)
        start += size

    train_words = {word for u in utterances if u.split == "train" for word in u.text.split()}
    unseen = sorted(set(WORDS) - train_words)
    if unseen:
        print(f"warning: words never in the training split: {' '.join(unseen)}", file=sys.stderr)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the corpus is not.
        for utterance in utterances:
            (staging / utterance.relative_dir()).mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(synthesise, u, staging, args.trim_threshold): u for u in utterances}
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except subprocess.CalledProcessError as error:
                stderr = (error.stderr or b"").decode(errors="replace").strip()
                raise SystemExit(
                    f"synthesis of {futures[future].utterance_id} failed: "
                    f"{error.cmd[0]} exited {error.returncode}: {stderr}"
                ) from error
            finally:
                # On failure or Ctrl-C, do not wait for the queued clips on the way out.
                for pending in futures:
                    pending.cancel()
        write_transcripts(staging, utterances)
        write_speakers_file(staging, voices, list(split_sizes))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    for split, size in split_sizes.items():
        print(f"{split}: {size} utterances")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
