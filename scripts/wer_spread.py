"""``python scripts/wer_spread.py --out DIR``: the demo's speech comparison over several
pretraining seeds, fine-tuned and decoded greedily and with an n-gram LM, as WER mean
and spread.

For every criterion of the demo (``tiny_gumbel``, ``tiny_diversity``, ``tiny_knn_ce``
with the demo's overrides: 2 x 320 codes, K = 1) and every seed it

1. pretrains with stock ``fairseq-hydra-train`` (``common.seed`` = the seed),
2. fine-tunes with CTC (``configs/finetuning/tiny.yaml``, its own seed),
3. decodes the test split with ``knnvq-infer``: greedily, and with a beam search over a
   word n-gram LM that ``knnvq-ngram-lm`` writes from the training transcripts
   (``train.wrd``), lexicon from the same words,

at most ``--jobs`` training processes at a time, one torch thread each. A rerun into the
same folder skips the runs and decodings that finished. It writes ``summary.md`` and
``summary.json``: each run's test WER, and per criterion the mean and the sample
standard deviation over the seeds.

A script of the repository (it uses ``scripts/demo.py`` and ``configs/``), not of the
installed package.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402  (scripts/demo.py)

from fairseq_knnvq import study  # noqa: E402
from fairseq_knnvq.files import atomic_write_text  # noqa: E402

LM_ORDER = 3


def run_name(config: str, seed: int, finetune_updates: Optional[int] = None) -> str:
    """The fine-tuning run's folder name; ``_ft<N>`` when fine-tuning is not the config's length."""
    return f"{config}_seed{seed}" + (f"_ft{finetune_updates}" if finetune_updates else "")


def pretrain_and_finetune(
    config: str,
    seed: int,
    out: Path,
    data: Path,
    config_dir: Path,
    pretrain_updates: Optional[int],
    finetune_updates: Optional[int],
    progress: study.Progress,
) -> None:
    name = run_name(config, seed, finetune_updates)
    finetuned = out / "finetune" / name / "checkpoints" / "checkpoint_best.pt"
    if finetuned.is_file():
        progress(f"{name}: fine-tuned already, skipped")
        return
    fixed = [f"task.data={data}", *demo.SPEECH_OVERRIDES]
    if pretrain_updates:
        fixed.append(f"optimization.max_update={pretrain_updates}")
    pretraining = study.Study(
        config_dir / "pretraining", [config], [], [seed], out / "speech", fixed, study.DEFAULT_METRICS["speech"]
    )
    point = study.Point(config, (), seed)
    if pretraining.finished(point) is None:
        pretraining.run_point(point, 1, 1, progress)
    checkpoint = point.folder(out / "speech") / "checkpoints" / "checkpoint_last.pt"
    demo.finetune(name, checkpoint, data, out, config_dir, finetune_updates, progress, 1)


def decode(name: str, data: Path, out: Path, extra: Sequence[str]) -> Dict[str, object]:
    """knnvq-infer on the test split into ``decode/<name>/`` (greedy: wer.test.json, beam
    search: wer.test.beam.json), unless done already."""
    from fairseq_knnvq.cli import infer_ctc

    decode_dir = out / "decode" / name
    summary_path = decode_dir / ("wer.test.beam.json" if extra else "wer.test.json")
    if summary_path.is_file():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    checkpoint = out / "finetune" / name / "checkpoints" / "checkpoint_best.pt"
    infer_ctc.main(
        [
            str(checkpoint),
            "--data",
            str(data),
            "--subset",
            "test",
            "--output-dir",
            str(decode_dir),
            "--cpu",
            "--no-progress",
            *extra,
        ]
    )
    return json.loads(summary_path.read_text(encoding="utf-8"))


def mean_sd(values: List[float]) -> Dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/wer_spread.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (a rerun skips finished work)")
    parser.add_argument("--configs", default=",".join(demo.SPEECH_VARIANTS), help="pretraining configs")
    parser.add_argument("--seeds", default="1,2,3", help="pretraining seeds")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    parser.add_argument("--pretrain-updates", type=int, default=None, help="default: the configs'")
    parser.add_argument("--finetune-updates", type=int, default=None, help="default: the config's")
    parser.add_argument("--train-only", action="store_true", help="train, do not decode")
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="decode the runs fine-tuned so far (the others are listed as not run)",
    )
    parser.add_argument("--lm-order", type=int, default=LM_ORDER, help="order of the word n-gram LM")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.out.resolve()
    data = out / "data"
    progress = study.Progress()
    if not (data / "test.ltr").is_file():
        demo.prepare_speech(demo.DEFAULT_CORPUS, data, progress)
    if not args.decode_only:
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(
                    pretrain_and_finetune,
                    c,
                    s,
                    out,
                    data,
                    demo.DEFAULT_CONFIGS,
                    args.pretrain_updates,
                    args.finetune_updates,
                    progress,
                )
                for s in seeds
                for c in configs
            ]
            for future in futures:
                future.result()
    if args.train_only:
        return 0

    from fairseq_knnvq.cli import ngram_lm

    lm = out / "lm" / f"train.{args.lm_order}gram.arpa"
    if not lm.is_file():
        ngram_lm.main([str(data / "train.wrd"), "--order", str(args.lm_order), "--output", str(lm)])
    lexicon_words = data / "train.wrd"
    runs, not_run = [], []
    for config in configs:
        for seed in seeds:
            name = run_name(config, seed, args.finetune_updates)
            checkpoint = out / "finetune" / name / "checkpoints" / "checkpoint_best.pt"
            if not checkpoint.is_file() or checkpoint.stat().st_size == 0:
                not_run.append(name)
                continue
            progress(f"decode {name}")
            greedy = decode(name, data, out, [])
            beam = decode(name, data, out, ["--lm", str(lm), "--lexicon-words", str(lexicon_words)])
            runs.append(
                {
                    "config": config,
                    "seed": seed,
                    "greedy_wer": greedy["wer"],
                    "lm_wer": beam["wer"],
                    "greedy_errors": greedy["num_word_errors"],
                    "lm_errors": beam["num_word_errors"],
                    "num_words": greedy["num_words"],
                    "lm_decoding": beam["decoding"],
                }
            )
    configs = [c for c in configs if any(r["config"] == c for r in runs)]
    per_config = {
        c: {kind: mean_sd([r[f"{kind}_wer"] for r in runs if r["config"] == c]) for kind in ("greedy", "lm")}
        for c in configs
    }
    lines = [
        "| pretraining criterion | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ± sd (greedy) | mean ± sd (LM) |",
        "|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for c in configs:
        cells = [
            next(
                (f"{r['greedy_wer']:.2f} / {r['lm_wer']:.2f}" for r in runs if r["config"] == c and r["seed"] == s),
                "not run",
            )
            for s in seeds
        ]
        g, l_ = per_config[c]["greedy"], per_config[c]["lm"]
        lines.append(
            f"| `{c}` | "
            + " | ".join(cells)
            + f" | {g['mean']:.2f} ± {g['sd']:.2f} | {l_['mean']:.2f} ± {l_['sd']:.2f} |"
        )
    markdown = (
        "Test WER (%) of the tiny corpus, greedy / beam search with a "
        f"{args.lm_order}-gram LM of the training transcripts, per pretraining seed "
        "(sd: sample standard deviation over the seeds):\n\n"
        + "\n".join(lines)
        + "\n"
        + (f"\nNot run: {', '.join(not_run)}.\n" if not_run else "")
    )
    atomic_write_text(
        out / "summary.json", json.dumps({"runs": runs, "per_config": per_config, "not_run": not_run}, indent=2) + "\n"
    )
    atomic_write_text(out / "summary.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
