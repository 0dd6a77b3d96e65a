"""CTC beam search with an n-gram language model, as fairseq's ``kenlm`` decoder does it
(``examples/speech_recognition/new/decoders/flashlight_decoder.py``): flashlight-text's
``LexiconDecoder`` (words spelled in the model's units, KenLM scores whole words) or
``LexiconFreeDecoder`` (the LM scores the units themselves), over the log-probabilities
of every frame. ``knnvq-infer --lm`` uses it; it needs the ``lm`` extra
(``pip install 'fairseq-knnvq[lm]'``: flashlight-text, which has KenLM built in).

The defaults are those of fairseq's decoder config
(``examples/speech_recognition/new/decoders/decoder_config.py``: beam 50, beam
threshold 50, LM weight 2, word score -1, silence weight 0, unknown-word weight -inf);
LM weight 2, word score -1 and silence weight 0 are also the values of the wav2vec 2.0
README's ``--w2l-decoder kenlm`` command. The silence token is ``|`` where the
dictionary has it (else ``</s>``), the blank is the CTC blank, as there.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

LM_EXTRA_HINT = "pip install 'fairseq-knnvq[lm]' (or pip install flashlight-text)"


class BeamSearchError(Exception):
    """A problem with the LM, the lexicon or the options that the user has to fix."""


@dataclasses.dataclass(frozen=True)
class BeamSearchOptions:
    beam: int = 50
    beam_threshold: float = 50.0
    lm_weight: float = 2.0
    word_score: float = -1.0
    sil_weight: float = 0.0
    unk_weight: float = -math.inf
    beam_size_token: Optional[int] = None  # None: every unit of the dictionary

    def as_record(self) -> Dict[str, object]:
        record = dataclasses.asdict(self)
        record["unk_weight"] = str(self.unk_weight) if math.isinf(self.unk_weight) else self.unk_weight
        return record


def import_flashlight(option: str):
    """flashlight-text's decoder module, or a BeamSearchError naming the extra."""
    try:
        from flashlight.lib.text import decoder, dictionary
        from flashlight.lib.text.decoder.kenlm import KenLM
    except ImportError as error:
        raise BeamSearchError(
            f"{option} needs flashlight-text, which is not installed ({error}): {LM_EXTRA_HINT}"
        ) from None
    return decoder, dictionary, KenLM


def read_lexicon(path: Path) -> List[Tuple[str, List[str], int]]:
    """``WORD U1 U2 ... |`` lines (word, then its spelling in units, separated by spaces
    or a tab: fairseq's and LibriSpeech's lexicon format) as (word, spelling, line)."""
    entries = []
    with open(path, encoding="utf-8") as lexicon:
        for number, line in enumerate(lexicon, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise BeamSearchError(
                    f"lexicon {path} line {number}: '{line.strip()}' has a word but no spelling; each line is "
                    "'WORD U1 U2 ... |' (for a plain word list use --lexicon-words)"
                )
            entries.append((fields[0], fields[1:], number))
    if not entries:
        raise BeamSearchError(f"lexicon {path} has no entries")
    return entries


def lexicon_from_words(path: Path, symbols: Sequence[str]) -> List[Tuple[str, List[str], int]]:
    """Every distinct word of a word list or transcript file (whitespace-separated),
    spelled letter by letter with the word boundary ``|`` at the end, as fairseq's
    ``.ltr`` labels spell them."""
    if "|" not in symbols:
        raise BeamSearchError(
            f"--lexicon-words {path} spells words in letters with the word boundary '|', which the model's "
            "dictionary does not have (not a letter model): give a --lexicon that spells each word in its units"
        )
    entries, seen = [], set()
    with open(path, encoding="utf-8") as words:
        for number, line in enumerate(words, start=1):
            for word in line.split():
                if word not in seen:
                    seen.add(word)
                    entries.append((word, [*word, "|"], number))
    if not entries:
        raise BeamSearchError(f"--lexicon-words {path} holds no words")
    return entries


def check_spellings(entries: Sequence[Tuple[str, List[str], int]], units: Mapping[str, int], source: str) -> None:
    """Every unit of every spelling must be one of the model's units."""
    bad = [(word, spelling, number, [u for u in spelling if u not in units]) for word, spelling, number in entries]
    bad = [b for b in bad if b[3]]
    if bad:
        word, spelling, number, unknown = bad[0]
        missing = sorted({u for b in bad for u in b[3]})
        raise BeamSearchError(
            f"{source}: {len(bad)} words are spelled with units the model does not have ({' '.join(missing)}), "
            f"e.g. line {number}: {word} -> {' '.join(spelling)}. Spell them in the units of the dictionary the "
            "model was fine-tuned with, or leave those words out"
        )


class CtcBeamSearch:
    """Beam search over one utterance's (T, V) log-probabilities at a time."""

    def __init__(
        self,
        symbols: Sequence[str],
        blank: int,
        options: BeamSearchOptions,
        lm_path: Optional[Path],
        lexicon: Optional[Sequence[Tuple[str, List[str], int]]],
    ) -> None:
        decoder, dictionary, self._kenlm = import_flashlight("--lm" if lm_path is not None else "beam search")
        self.options = options
        self.blank = blank
        self.symbols = list(symbols)
        units = {symbol: index for index, symbol in enumerate(symbols)}
        self.silence = units["|"] if "|" in units else units.get("</s>", blank)
        beam_size_token = options.beam_size_token or len(symbols)
        self.lexicon = lexicon
        if lexicon is not None:
            word_dict = dictionary.Dictionary()
            for word, _, _ in lexicon:
                if not word_dict.contains(word):
                    word_dict.add_entry(word)
            if not word_dict.contains("<unk>"):
                word_dict.add_entry("<unk>")
            self.word_dict = word_dict
            self.lm = self._load_lm(lm_path, word_dict)
            trie = decoder.Trie(len(symbols), self.silence)
            start = self.lm.start(False)
            for word, spelling, _ in lexicon:
                index = word_dict.get_index(word)
                _, score = self.lm.score(start, index)
                trie.insert([units[u] for u in spelling], index, score)
            trie.smear(decoder.SmearingMode.MAX)
            self.decoder = decoder.LexiconDecoder(
                decoder.LexiconDecoderOptions(
                    beam_size=options.beam,
                    beam_size_token=beam_size_token,
                    beam_threshold=options.beam_threshold,
                    lm_weight=options.lm_weight,
                    word_score=options.word_score,
                    unk_score=options.unk_weight,
                    sil_score=options.sil_weight,
                    log_add=False,
                    criterion_type=decoder.CriterionType.CTC,
                ),
                trie,
                self.lm,
                self.silence,
                blank,
                word_dict.get_index("<unk>"),
                [],
                False,
            )
        else:
            unit_dict = dictionary.Dictionary()
            for symbol in symbols:
                unit_dict.add_entry(symbol)
            self.lm = self._load_lm(lm_path, unit_dict) if lm_path is not None else decoder.ZeroLM()
            self.decoder = decoder.LexiconFreeDecoder(
                decoder.LexiconFreeDecoderOptions(
                    beam_size=options.beam,
                    beam_size_token=beam_size_token,
                    beam_threshold=options.beam_threshold,
                    lm_weight=options.lm_weight,
                    sil_score=options.sil_weight,
                    log_add=False,
                    criterion_type=decoder.CriterionType.CTC,
                ),
                self.lm,
                self.silence,
                blank,
                [],
            )

    def _load_lm(self, lm_path: Optional[Path], vocabulary):
        if lm_path is None:
            raise BeamSearchError("a lexicon needs a word language model: give --lm")
        try:
            return self._kenlm(str(lm_path), vocabulary)
        except Exception as error:  # KenLM raises RuntimeError with its own message
            raise BeamSearchError(
                f"--lm {lm_path} could not be loaded by KenLM ({str(error).splitlines()[0]}): give an ARPA file "
                "(knnvq-ngram-lm writes one; KenLM needs at least a bigram model) or a KenLM binary"
            ) from None

    def decode(self, log_probs) -> Tuple[List[int], Optional[List[str]]]:
        """Best hypothesis for a (T, V) float32 CPU tensor: its units (repeats collapsed,
        blank dropped) and, with a lexicon, its words."""
        import torch

        emissions = log_probs.to(torch.float32).contiguous()
        frames, vocabulary = emissions.shape
        results = self.decoder.decode(emissions.data_ptr(), frames, vocabulary)
        best = results[0]
        units: List[int] = []
        previous = None
        for unit in best.tokens:
            if unit != previous and unit != self.blank and unit >= 0:
                units.append(unit)
            previous = unit
        words = None
        if self.lexicon is not None:
            words = [self.word_dict.get_entry(index) for index in best.words if index >= 0]
        return units, words
