"""Peak memory of the KNN-CE loss at large codebooks (M = 16384, 65536 entries).

    python benchmarks/bench_memory.py            # N = 4096 and 16384 frames (3 min on a quiet 2-core machine)
    python benchmarks/bench_memory.py --quick    # N = 2048 (1 min)

Each case runs one forward + backward pass in a fresh process and reports the peak
resident memory above the inputs (method: ``harness.py``). Compared, with G=1, D=256,
vq_dim=64, softmax smoothing:

- ``ours_none`` / ``ours_knn_ce``: ``SmoothedVectorQuantizer`` without and with the KNN-CE
  loss (training mode, the neighbour search automatically chunked);
- ``softmax_smoothing`` / ``softmax_smoothing_knn_ce``: the bare smoothing
  ``p = softmax(W z / tau)``, ``q = p C``, without and with KNN-CE computed by
  ``softmax_and_knn_loss`` (the softmax and the loss in one autograd node, as the
  quantizer does);
- ``softmax_smoothing_knn_ce_separate``: KNN-CE by ``knn_vertex_loss`` as a second
  autograd node, which needs one more N x M tensor in the backward pass (shown for
  comparison; full run only).

Target: the peak with KNN-CE stays <= 1.25x the peak of the same smoothing without a
regulariser. Writes ``benchmarks/results/memory[_quick].json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

import harness as h

BASELINE = {"ours_knn_ce": "ours_none", "softmax_smoothing_knn_ce": "softmax_smoothing",
            "softmax_smoothing_knn_ce_separate": "softmax_smoothing"}


def shapes(quick: bool) -> List[Dict[str, Any]]:
    if quick:
        return [dict(entries=16384, n=2048), dict(entries=65536, n=2048)]
    return [dict(entries=16384, n=4096), dict(entries=16384, n=16384), dict(entries=65536, n=4096)]


def methods(quick: bool) -> List[str]:
    out = ["ours_none", "ours_knn_ce", "softmax_smoothing", "softmax_smoothing_knn_ce"]
    return out if quick else out + ["softmax_smoothing_knn_ce_separate"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 2048 only, no separate-node variant")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory[_quick].json)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(h.HERE, "results", "memory_quick.json" if args.quick else "memory.json")

    info = h.machine()
    print(f"CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}, "
          f"load {info['load_average_1min_at_start']}")
    calibration = h.calibrate()
    print(f"peak memory calibration: a {h.fmt_bytes(calibration['nominal_bytes'])} tensor measured as "
          f"{h.fmt_bytes(calibration['peak_bytes'])}")
    start = time.time()
    results, targets = [], []
    for shape in shapes(args.quick):
        label = f"G=1 M={shape['entries']} N={shape['n']}"
        logits_bytes = 4 * shape["n"] * shape["entries"]
        print(f"\n{label} (one N x M float32 tensor: {h.fmt_bytes(logits_bytes)})")
        print(f"  {'method':<36s} {'peak mem':>11s} {'x N*M':>7s} {'/ no regulariser':>17s}")
        rows: Dict[str, Any] = {}
        for method in methods(args.quick):
            c = h.case(method, dim=256, groups=1, vq_dim=64, smoothing="softmax", **shape)
            rows[method] = h.measure_peak(c)
            peak = rows[method]["peak_bytes"]
            base = rows.get(BASELINE.get(method, ""), {}).get("peak_bytes")
            rows[method]["ratio"] = None if base is None else peak / base
            ratio = "" if base is None else f"{peak / base:.3f}"
            print(f"  {method:<36s} {h.fmt_bytes(peak):>11s} {peak / logits_bytes:>7.2f} {ratio:>17s}")
            sys.stdout.flush()
        results.append({"label": label, "shape": shape, "logits_bytes": logits_bytes, "methods": rows})
        for method in ("ours_knn_ce", "softmax_smoothing_knn_ce"):
            targets.append(h.check(f"peak with KNN-CE / without ({method}, {label})", rows[method]["ratio"], "<=", 1.25))
    h.print_targets(targets)
    h.write_json(out, {
        "command": "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info, "memory_calibration": calibration, "wall_seconds": time.time() - start,
        "results": results, "targets": targets,
    })
    print(f"\nwrote {os.path.relpath(out, h.REPO)}")
    return 0 if all(t["met"] is not False for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
