"""The one rule for CTC labels: every unit of a label line must be in the dictionary.

fairseq's ``audio_finetuning`` task maps a unit missing from ``dict.<labels>.txt`` to
``<unk>`` and trains on it without a word; ``knnvq-infer`` would then score against
references the model can never produce. Both the fine-tuning task
(``audio_finetuning_knnvq``, before training starts) and ``knnvq-infer`` (before
decoding) check labels with :func:`find_unknown_units` and stop with
:func:`describe_unknown_units`, which names the file, the lines and the units.
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Iterable, Optional, Tuple

# How many line numbers and units a message lists.
MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class UnknownUnits:
    """Units of a label file that the dictionary lacks, and where they are."""

    units: Tuple[str, ...]  # distinct, sorted
    line_numbers: Tuple[int, ...]  # 1-based, of the lines holding any of them
    num_lines: int  # lines checked


def find_unknown_units(label_lines: Iterable[str], known: Collection[str]) -> Optional[UnknownUnits]:
    """``None`` when every whitespace-separated unit of every line is in ``known``."""
    units = set()
    line_numbers = []
    num_lines = 0
    for number, line in enumerate(label_lines, start=1):
        num_lines = number
        missing = [unit for unit in line.split() if unit not in known]
        if missing:
            units.update(missing)
            line_numbers.append(number)
    if not line_numbers:
        return None
    return UnknownUnits(tuple(sorted(units)), tuple(line_numbers), num_lines)


def describe_unknown_units(label_path: str, found: UnknownUnits, dictionary_name: str) -> str:
    """``<file> line 3 (and 4 more of 120 lines: 7, 9, ...) has units that <dictionary>
    lacks: 'a' 'é' '1'`` (the caller adds how to fix it)."""
    shown_units = " ".join(repr(unit) for unit in found.units[:MAX_LISTED])
    if len(found.units) > MAX_LISTED:
        shown_units += f" ... ({len(found.units)} in all)"
    first, rest = found.line_numbers[0], found.line_numbers[1:]
    where = f"line {first}"
    if rest:
        listed = ", ".join(str(n) for n in rest[:MAX_LISTED])
        more = ", ..." if len(rest) > MAX_LISTED else ""
        where += f" (and {len(rest)} more of its {found.num_lines} lines: {listed}{more})"
    return f"{label_path} {where} has units that {dictionary_name} lacks: {shown_units}"
