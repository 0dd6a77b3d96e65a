"""Peak memory of the quantizer against the bare smoothing at large codebooks
(M = 16384, 65536 entries), and of a whole image-autoencoder training step.

    python benchmarks/bench_memory.py            # N = 4096 frames; image step at batch 2 (about 20 min here)
    python benchmarks/bench_memory.py --quick    # N = 2048 frames; image step at batch 1 (about 8 min here)
    python benchmarks/bench_memory.py --no-image # the quantizer shapes only
    python benchmarks/bench_memory.py --smoothing gumbel_hard --no-image  # the quantizer in gumbel_hard

Each case runs one forward + backward pass in a fresh process and reports the peak
resident memory above the inputs (method: ``harness.py``).

Quantizer shapes (G=1, D=256, vq_dim=64, ``softmax`` smoothing), every ratio against
the bare smoothing ``softmax_smoothing``, ``p = softmax(W z / tau)``, ``q = p C``:

- ``ours_none`` / ``ours_knn_ce`` / ``ours_diversity``: ``SmoothedVectorQuantizer`` in
  training mode without a regulariser, with KNN-CE, with wav2vec 2.0's diversity loss;
- ``softmax_smoothing_knn_ce``: the bare smoothing plus KNN-CE by
  ``KnnVertexLoss.with_softmax`` (the softmax and the loss in one autograd node);
- ``softmax_smoothing_knn_ce_separate`` (full run only): KNN-CE by ``knn_vertex_loss``
  as a second autograd node, which needs one more N x M tensor.

Image step: ``vq_image_autoencoder`` at the ImageNet f8 / M = 16384 shape (256 px
images, 32 x 32 codes each, 128-512 channels, code_dim 256, Gumbel smoothing) with the
batch reduced to fit this machine; ``image_ours_knn_ce`` / ``image_ours_none``: the
model as configured, ``image_bare``: the same model with the bare smoothing in place of
its quantizer.

Targets: quantizer / bare smoothing <= 1.15 with KNN-CE and without a regulariser,
<= 1.3 with the diversity loss; KNN-CE / no regulariser <= 1.25 (bare and quantizer).
Writes ``benchmarks/results/memory[_quick].json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

import harness as h

# method -> the method its ratio is taken against
BASELINE = {
    "ours_none": "softmax_smoothing",
    "ours_knn_ce": "softmax_smoothing",
    "ours_diversity": "softmax_smoothing",
    "softmax_smoothing_knn_ce": "softmax_smoothing",
    "softmax_smoothing_knn_ce_separate": "softmax_smoothing",
    "image_ours_knn_ce": "image_bare",
    "image_ours_none": "image_bare",
}
TARGETS = [  # (method, its baseline, limit)
    ("ours_knn_ce", "softmax_smoothing", 1.15),
    ("ours_none", "softmax_smoothing", 1.15),
    ("ours_diversity", "softmax_smoothing", 1.3),
    ("ours_knn_ce", "ours_none", 1.25),
    ("softmax_smoothing_knn_ce", "softmax_smoothing", 1.25),
]


def shapes(quick: bool) -> List[Dict[str, Any]]:
    n = 2048 if quick else 4096
    return [dict(entries=16384, n=n), dict(entries=65536, n=n)]


def methods(quick: bool) -> List[str]:
    out = ["softmax_smoothing", "ours_none", "ours_knn_ce", "ours_diversity", "softmax_smoothing_knn_ce"]
    return out if quick else out + ["softmax_smoothing_knn_ce_separate"]


def image_case(method: str, quick: bool) -> Dict[str, Any]:
    batch = 1 if quick else 2
    return h.case(
        method,
        n=batch * 32 * 32,
        dim=256,
        groups=1,
        entries=16384,
        vq_dim=256,
        downsample_factor=8,
        image_size=256,
        batch=batch,
        smoothing="gumbel",
        channels=128,
        max_channels=512,
        num_res_blocks=2,
    )


def image_methods(quick: bool) -> List[str]:
    return ["image_bare", "image_ours_knn_ce"] + ([] if quick else ["image_ours_none"])


def run_rows(cases: Dict[str, Dict[str, Any]], logits_bytes: int) -> Dict[str, Any]:
    print(f"  {'method':<36s} {'peak mem':>11s} {'x N*M':>7s} {'ratio':>7s}  against")
    rows: Dict[str, Any] = {}
    for method, c in cases.items():
        rows[method] = h.measure_peak(c, timeout=1800)
        peak = rows[method]["peak_bytes"]
        base_name = BASELINE.get(method)
        base = rows.get(base_name, {}).get("peak_bytes")
        rows[method]["ratio"] = None if base is None else peak / base
        rows[method]["ratio_against"] = base_name if base is not None else None
        ratio = "" if base is None else f"{peak / base:.3f}"
        print(
            f"  {method:<36s} {h.fmt_bytes(peak):>11s} {peak / logits_bytes:>7.2f} {ratio:>7s}  "
            f"{base_name if base is not None else ''}"
        )
        sys.stdout.flush()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="N = 2048, image step at batch 1, no separate-node variant"
    )
    parser.add_argument("--no-image", action="store_true", help="skip the image-autoencoder step")
    parser.add_argument(
        "--smoothing",
        default="softmax",
        choices=["softmax", "gumbel", "gumbel_hard", "ste"],
        help="smoothing of the quantizer cases (the bare smoothing stays softmax, the least "
        "any smoothed quantizer computes)",
    )
    parser.add_argument(
        "--num-updates",
        type=int,
        default=0,
        help="the quantizer cases run at the temperature of this update (wav2vec 2.0's schedule "
        "(2, 0.5, 0.999995): 0 gives tau 2, 300000 tau 0.5); the bare smoothing stays at tau 2",
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory[_quick].json)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(h.HERE, "results", "memory_quick.json" if args.quick else "memory.json")

    info = h.machine()
    print(
        f"CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']}, "
        f"{info['torch_threads']} threads, load {info['load_average_1min_at_start']}"
    )
    calibration = h.calibrate()
    print(
        f"peak memory calibration: a {h.fmt_bytes(calibration['nominal_bytes'])} tensor measured as "
        f"{h.fmt_bytes(calibration['peak_bytes'])}"
    )
    start = time.time()
    results, targets = [], []
    for shape in shapes(args.quick):
        label = f"G=1 M={shape['entries']} N={shape['n']}" + (
            f", quantizer smoothing {args.smoothing}" if args.smoothing != "softmax" else ""
        )
        if args.num_updates:
            tau = max(h.TEMP[0] * h.TEMP[2] ** args.num_updates, h.TEMP[1])
            label += f", quantizer at update {args.num_updates} (tau {tau:.3g})"
        logits_bytes = 4 * shape["n"] * shape["entries"]
        print(f"\n{label} (one N x M float32 tensor: {h.fmt_bytes(logits_bytes)})")
        cases = {
            m: h.case(
                m,
                dim=256,
                groups=1,
                vq_dim=64,
                smoothing=args.smoothing if m.startswith("ours_") else "softmax",
                **({"num_updates": args.num_updates} if m.startswith("ours_") and args.num_updates else {}),
                **shape,
            )
            for m in methods(args.quick)
        }
        rows = run_rows(cases, logits_bytes)
        results.append({"label": label, "shape": shape, "logits_bytes": logits_bytes, "methods": rows})
        for method, base, limit in TARGETS:
            ratio = rows[method]["peak_bytes"] / rows[base]["peak_bytes"]
            targets.append(h.check(f"peak {method} / {base} ({label})", ratio, "<=", limit))

    if not args.no_image:
        cases = {m: image_case(m, args.quick) for m in image_methods(args.quick)}
        c = cases["image_bare"]
        label = f"vq_image_autoencoder f8 M=16384, batch {c['batch']} x {c['image_size']} px (N={c['n']} positions)"
        logits_bytes = 4 * c["n"] * c["entries"]
        print(f"\n{label} (one N x M float32 tensor: {h.fmt_bytes(logits_bytes)})")
        rows = run_rows(cases, logits_bytes)
        results.append(
            {
                "label": label,
                "shape": {k: v for k, v in c.items() if k != "method"},
                "logits_bytes": logits_bytes,
                "methods": rows,
            }
        )

    h.print_targets(targets)
    h.write_json(
        out,
        {
            "command": "python benchmarks/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": info,
            "memory_calibration": calibration,
            "wall_seconds": time.time() - start,
            "results": results,
            "targets": targets,
        },
    )
    print(f"\nwrote {os.path.relpath(out, h.REPO)}")
    return 0 if all(t["met"] is not False for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
