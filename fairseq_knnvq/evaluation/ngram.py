"""A word (or unit) n-gram language model from transcripts, written as an ARPA file that
KenLM (and so ``knnvq-infer --lm``) loads: for tests, for the tiny corpus, and for users
without KenLM's ``lmplz``. Real LibriSpeech decoding uses the published 4-gram
(``lmplz``'s modified Kneser-Ney); this is the simpler interpolated absolute discounting.

Every sentence is ``<s> w_1 ... w_T </s>``. With ``c`` the counts of the training text,
for an n-gram order ``n`` and a history ``h`` of ``n - 1`` tokens that was seen
(``c(h .) = sum_v c(h v) > 0``)::

    P(w | h) = max(c(h w) - D_n, 0) / c(h .) + gamma(h) * P(w | h')
    gamma(h) = D_n * N1+(h .) / c(h .)          N1+(h .): distinct words seen after h

where ``h'`` drops the first token of ``h``; for an unseen history ``P(w | h) = P(w | h')``.
The recursion ends with ``P_0(w) = 1 / |V|``, uniform over the vocabulary ``V``: the
words seen, ``</s>`` and ``<unk>`` (``<s>`` is never predicted). The discount of order
``n`` is Ney's estimate ``D_n = n1 / (n1 + 2 n2)`` from the numbers of n-grams seen once
and twice, or 0.5 where that is not between 0 and 1.

The ARPA file holds, for every n-gram ``h w`` seen (and every unigram of ``V``),
``log10 P(w | h)`` and, for n-grams that are histories, the backoff ``log10 gamma(h w)``:
KenLM's back-off rule ``P(w | h) = gamma(h) P(w | h')`` for an ``h w`` not in the file
then gives exactly the interpolated probability above.
"""

from __future__ import annotations

import collections
import math
from typing import Dict, Iterable, List, Sequence, Tuple

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
DEFAULT_DISCOUNT = 0.5
# ARPA's log10 probability of a token that is never predicted (<s>).
NEVER = -99.0

NGram = Tuple[str, ...]


class NGramModel:
    """Counts of ``sentences`` (token lists) up to ``order`` and the probabilities above."""

    def __init__(self, sentences: Iterable[Sequence[str]], order: int) -> None:
        if order < 1:
            raise ValueError(f"the order of an n-gram model must be at least 1, got {order}")
        self.order = order
        # counts[n][ngram]: n-grams of n tokens, n = 1..order
        self.counts: List[Dict[NGram, int]] = [collections.Counter() for _ in range(order + 1)]
        words = set()
        num_sentences = 0
        for sentence in sentences:
            tokens = [BOS, *sentence, EOS]
            words.update(sentence)
            num_sentences += 1
            for n in range(1, order + 1):
                for i in range(len(tokens) - n + 1):
                    ngram = tuple(tokens[i : i + n])
                    if ngram != (BOS,):
                        self.counts[n][ngram] += 1
        if num_sentences == 0:
            raise ValueError("no sentences to count")
        for reserved in (BOS, EOS, UNK):
            words.discard(reserved)
        self.vocabulary: List[str] = sorted(words) + [EOS, UNK]
        self.discounts = [0.0] + [self._ney_discount(self.counts[n]) for n in range(1, order + 1)]
        # Per history h (n - 1 tokens) of order n: c(h .) and N1+(h .)
        self.history_totals: List[Dict[NGram, int]] = [collections.Counter() for _ in range(order + 1)]
        self.history_types: List[Dict[NGram, int]] = [collections.Counter() for _ in range(order + 1)]
        for n in range(1, order + 1):
            for ngram, count in self.counts[n].items():
                self.history_totals[n][ngram[:-1]] += count
                self.history_types[n][ngram[:-1]] += 1

    @staticmethod
    def _ney_discount(counts: Dict[NGram, int]) -> float:
        n1 = sum(1 for c in counts.values() if c == 1)
        n2 = sum(1 for c in counts.values() if c == 2)
        if n1 == 0 or n2 == 0:
            return DEFAULT_DISCOUNT
        discount = n1 / (n1 + 2 * n2)
        return discount if 0.0 < discount < 1.0 else DEFAULT_DISCOUNT

    def gamma(self, history: NGram) -> float:
        """The interpolation weight of the lower order after ``history`` (1 if unseen)."""
        n = len(history) + 1
        total = self.history_totals[n].get(history, 0)
        if total == 0:
            return 1.0
        return self.discounts[n] * self.history_types[n][history] / total

    def probability(self, word: str, history: Sequence[str]) -> float:
        """``P(word | history)``; the history is cut to ``order - 1`` tokens, words out
        of the vocabulary are ``<unk>``."""
        history = tuple(history)[max(0, len(history) - (self.order - 1)) :]
        if word not in self.vocabulary:
            word = UNK
        if word == BOS:
            return 0.0
        return self._probability(word, history)

    def _probability(self, word: str, history: NGram) -> float:
        n = len(history) + 1
        lower = self._probability(word, history[1:]) if history else 1.0 / len(self.vocabulary)
        total = self.history_totals[n].get(history, 0)
        if total == 0:
            return lower
        seen = max(self.counts[n].get(history + (word,), 0) - self.discounts[n], 0.0) / total
        return seen + self.gamma(history) * lower

    def arpa_entries(self) -> List[List[Tuple[NGram, float, float | None]]]:
        """Per order n (index n - 1): (n-gram, log10 P, log10 backoff or None), sorted."""
        histories = {h for n in range(2, self.order + 1) for h in self.history_totals[n]}
        orders = []
        for n in range(1, self.order + 1):
            ngrams = sorted(self.counts[n]) if n > 1 else [(BOS,)] + [(w,) for w in self.vocabulary]
            entries = []
            for ngram in ngrams:
                p = NEVER if ngram == (BOS,) else math.log10(self._probability(ngram[-1], ngram[:-1]))
                backoff = math.log10(self.gamma(ngram)) if n < self.order and ngram in histories else None
                entries.append((ngram, p, backoff))
            orders.append(entries)
        return orders

    def arpa(self) -> str:
        orders = self.arpa_entries()
        lines = ["", "\\data\\"] + [f"ngram {n}={len(entries)}" for n, entries in enumerate(orders, start=1)] + [""]
        for n, entries in enumerate(orders, start=1):
            lines.append(f"\\{n}-grams:")
            for ngram, p, backoff in entries:
                line = f"{p:.7f}\t{' '.join(ngram)}"
                if backoff is not None:
                    line += f"\t{backoff:.7f}"
                lines.append(line)
            lines.append("")
        lines.append("\\end\\")
        return "\n".join(lines) + "\n"


def read_sentences(lines: Iterable[str]) -> List[List[str]]:
    """Whitespace-separated tokens of each non-empty line."""
    return [line.split() for line in lines if line.strip()]
