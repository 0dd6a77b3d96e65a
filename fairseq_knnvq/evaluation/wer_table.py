"""WER tables in the layout of the wav2vec 2.0 paper's tables: one row per fine-tuning run
and language model ("none" for greedy decoding), one column per evaluation split
(dev-clean, dev-other, test-clean, test-other first), WER in percent, from the
``wer.<subset>[.beam].json`` files that ``knnvq-infer`` writes (``knnvq-wer-table``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

PAPER_SPLITS = ("dev_clean", "dev_other", "test_clean", "test_other")
NO_LM = "none"


class WerTableError(Exception):
    """A decode folder that holds no decodings, or two decodings of one cell."""


def lm_label(summary: dict) -> str:
    """ "none" for greedy decoding, else the LM file's name ("beam, no LM" without one)."""
    search = summary.get("beam_search")
    if summary.get("decoding") == "ctc_greedy" or search is None:
        return NO_LM
    return Path(search["lm"]).name if search.get("lm") else "beam, no LM"


def read_decodings(folder: Path) -> List[Tuple[Path, dict]]:
    """The knnvq-infer summaries (``wer.*.json``) of a decode folder."""
    found = []
    for path in sorted(folder.glob("wer.*.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise WerTableError(f"{path} is not a knnvq-infer summary ({error})") from None
        if isinstance(summary, dict) and {"subset", "wer", "decoding"} <= summary.keys():
            found.append((path, summary))
    if not found:
        raise WerTableError(
            f"{folder} holds no knnvq-infer summary (wer.<subset>.json): decode into it with knnvq-infer --output-dir"
        )
    return found


def build_table(runs: Sequence[Tuple[str, Path]]) -> Tuple[List[str], List[Dict[str, object]]]:
    """The splits (columns) and one row per (run, LM): ``{"run", "lm", <split>: wer}``."""
    cells: Dict[Tuple[str, str], Dict[str, Tuple[float, Path]]] = {}
    splits = set()
    for label, folder in runs:
        for path, summary in read_decodings(folder):
            key = (label, lm_label(summary))
            subset = summary["subset"]
            if subset in cells.setdefault(key, {}):
                raise WerTableError(
                    f"{cells[key][subset][1]} and {path} both decode {subset} of run {label} with LM "
                    f"{key[1]}: keep one (decode other LM settings into another --output-dir)"
                )
            cells[key][subset] = (summary["wer"], path)
            splits.add(subset)
    columns = [s for s in PAPER_SPLITS if s in splits] + sorted(splits - set(PAPER_SPLITS))
    rows = []
    for (label, lm), values in cells.items():
        rows.append({"run": label, "lm": lm, **{s: values[s][0] for s in columns if s in values}})
    # Runs in the order given; within a run, no LM first.
    order = {label: i for i, (label, _) in enumerate(runs)}
    rows.sort(key=lambda r: (order[r["run"]], r["lm"] != NO_LM, r["lm"]))
    return columns, rows


def markdown(columns: Sequence[str], rows: Sequence[Dict[str, object]]) -> str:
    lines = [
        "| run | LM | " + " | ".join(c.replace("_", "-") for c in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = [f"{row[c]:.2f}" if c in row else "" for c in columns]
        lines.append(f"| {row['run']} | {row['lm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(columns: Sequence[str], rows: Sequence[Dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", "lm", *columns])
    for row in rows:
        writer.writerow([row["run"], row["lm"], *[row.get(c, "") for c in columns]])
    return out.getvalue()
