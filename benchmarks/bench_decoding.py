"""Greedy CTC decoding of a manifest one utterance at a time against padded batches, side
by side: the time of each, the speed-up, and whether the hypotheses are the same (they
must be: the group-norm feature encoder runs its first block per utterance, see
``fairseq_knnvq.evaluation.speech.padding_blind_features``).

    python benchmarks/bench_decoding.py CHECKPOINT --data DIR --subset test \\
        [--batch-sizes 1,4,16] [--max-tokens 1600000] [--repeats 3] [--warmup 1] [--device cpu]

The model is loaded once (as ``knnvq-infer`` loads it) and decodes the subset
``--warmup`` times untimed; then every batching decodes the whole subset ``--repeats``
times and the median wall time counts. Writes
``benchmarks/results/decoding.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # a clean clone runs these scripts without installing
    sys.path.insert(0, REPO)

import fairseq  # noqa: E402,F401  (before the plugin, so that it registers its fairseq parts)
import torch  # noqa: E402

from fairseq_knnvq.cli import infer_ctc  # noqa: E402
from fairseq_knnvq.evaluation.speech import Batching, decode_subset  # noqa: E402
from fairseq_knnvq.files import atomic_write_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--subset", default="test")
    parser.add_argument("--batch-sizes", default="1,4,16", help="utterances per batch, comma-separated")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=infer_ctc.DEFAULT_MAX_TOKENS,
        help="also decode with this many samples per batch (knnvq-infer's default); 0: skip",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed decodes of the subset first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path(HERE) / "results" / "decoding.json")
    args = parser.parse_args()

    infer_ctc.import_plugins(None)
    state, _ = infer_ctc.load_checkpoint_state(args.checkpoint.resolve(), args.data.resolve(), None)
    model, _, task = infer_ctc.build_model(state, args.checkpoint.resolve(), args.device)
    batchings = {f"batch_size={b}": Batching(None, int(b), 1) for b in args.batch_sizes.split(",")}
    if args.max_tokens:
        batchings[f"max_tokens={args.max_tokens}"] = Batching(args.max_tokens, None, 1)
    results, hypotheses = {}, {}
    for _ in range(args.warmup):
        decode_subset(model, task, args.subset, next(iter(batchings.values())), args.device, False)
    for name, batching in batchings.items():
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            hypotheses[name] = decode_subset(model, task, args.subset, batching, args.device, False)
            seconds.append(time.perf_counter() - started)
        results[name] = {
            "median_seconds": round(statistics.median(seconds), 3),
            "seconds": [round(s, 3) for s in seconds],
        }
        print(f"{name}: {results[name]['median_seconds']:.2f} s", flush=True)
    baseline = next(iter(results))
    for name, result in results.items():
        result["speed_up"] = round(results[baseline]["median_seconds"] / result["median_seconds"], 2)
        result["same_hypotheses_as_" + baseline] = hypotheses[name] == hypotheses[baseline]
    record = {
        "checkpoint": str(args.checkpoint.resolve()),
        "subset": args.subset,
        "utterances": len(hypotheses[baseline]),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "command": " ".join(sys.argv),
        "results": results,
    }
    atomic_write_text(args.output, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
