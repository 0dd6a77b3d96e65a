"""Forward + backward time and peak memory of the quantizers, side by side.

    python benchmarks/bench_quantizer.py            # every shape (19 min on a quiet 2-core machine)
    python benchmarks/bench_quantizer.py --quick    # the target shapes (3 min)
    python benchmarks/bench_quantizer.py --quick --device cuda   # on a GPU

Compares, in one process with interleaved repeats (medians):

- fairseq's ``GumbelVectorQuantizer`` plus wav2vec 2.0's diversity loss, the stock
  baseline (it forms the quantized vectors by a broadcast multiply N x G*M x d);
- ``SmoothedVectorQuantizer`` with no regulariser, the diversity loss, KNN-CE, KNN-L2;
- the KNN regulariser alone against the naive ``cdist(eye(M), P)`` form.

Shapes: wav2vec 2.0 base (D=512, G=2, M=320, vq_dim=256; N = 2k, 8k, 32k frames) and
image codebooks (G=1, M = 1024, 16384, 65536; N = 4k, 16k; D=256, vq_dim=64). A case
whose largest single tensor exceeds ``--max-tensor-gib`` is skipped and listed as
such (fairseq's broadcast at N=32k is 10 GiB; our N x M logits at 16k x 64k are 4 GiB).
Peak memory is measured per case in a fresh process (see ``harness.py``). Smoothing is
``gumbel_hard`` throughout, what fairseq's quantizer does in training. Timings run on
one thread unless ``--threads`` says otherwise (0: all cores) and record both wall-clock
and CPU time of this process; the targets compare CPU-time medians (``--time-basis``),
which on a shared machine leave out the time other processes held the cores, and the
wall-clock ratios are printed and written beside them.

On a GPU (``--device cuda``) the steps run there, timings are wall-clock (each step ends
by reading its loss back, which waits for the device), and peak memory is the CUDA
allocator's peak above the inputs (``torch.cuda.max_memory_allocated``), still one
fresh process per case.

Prints a table and the targets, and writes JSON with every measurement and ratio to
``benchmarks/results/quantizer[_cuda][_quick].json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

import harness as h

WAV2VEC = dict(dim=512, groups=2, entries=320, vq_dim=256)
QUANTIZERS = ["fairseq_diversity", "ours_none", "ours_diversity", "ours_knn_ce", "ours_knn_l2"]
REGULARIZERS = ["regularizer_knn_ce", "regularizer_knn_l2", "naive_cdist_l2"]


def shape_groups(quick: bool) -> List[Dict[str, Any]]:
    """Each group is timed together (interleaved); ``memory`` lists the methods whose
    peak memory is measured."""
    groups = []
    for n in [2048, 8192] if quick else [2048, 8192, 32768]:
        groups.append(
            dict(
                label=f"wav2vec2 base N={n}",
                shape=dict(n=n, **WAV2VEC),
                methods=QUANTIZERS,
                memory=["fairseq_diversity", "ours_none", "ours_knn_ce"],
            )
        )
    image = (
        [(1024, 4096)]
        if quick
        else [(1024, 4096), (1024, 16384), (16384, 4096), (16384, 16384), (65536, 4096), (65536, 16384)]
    )
    for m, n in image:
        groups.append(
            dict(
                label=f"image G=1 M={m} N={n}",
                shape=dict(n=n, dim=256, groups=1, entries=m, vq_dim=64),
                methods=["fairseq_diversity", "ours_none", "ours_knn_ce", "ours_knn_l2"],
                memory=["fairseq_diversity", "ours_none", "ours_knn_ce"] if m == 1024 else [],
            )
        )
    naive = (
        [(320, 2, 8192), (1024, 1, 4096)]
        if quick
        else [(320, 2, 8192), (1024, 1, 4096), (1024, 1, 16384), (16384, 1, 4096)]
    )
    for m, g, n in naive:
        groups.append(
            dict(
                label=f"regulariser alone G={g} M={m} N={n}",
                shape=dict(n=n, dim=0, groups=g, entries=m, vq_dim=g),
                methods=REGULARIZERS,
                memory=[],
            )
        )
    return groups


def skip_reason(c: Dict[str, Any], args) -> Optional[str]:
    size = h.largest_tensor_bytes(c)
    if size > args.max_tensor_gib * (1 << 30):
        return f"largest tensor {size / (1 << 30):.1f} GiB > --max-tensor-gib {args.max_tensor_gib}"
    if c["method"] == "naive_cdist_l2" and c["entries"] > args.naive_max_entries:
        # O(N * M^2) multiply-adds forward and twice that backward
        flops = 6 * c["n"] * c["entries"] ** 2 * c["groups"]
        return f"O(N*M^2): ~{flops / 1e12:.1f} TFLOP per step, > --naive-max-entries {args.naive_max_entries}"
    return None


def run_group(group: Dict[str, Any], args) -> Dict[str, Any]:
    cases = {m: h.case(m, **group["shape"], device=args.device) for m in group["methods"]}
    skipped = {m: r for m, c in cases.items() if (r := skip_reason(c, args))}
    steps = {m: h.build_step(c) for m, c in cases.items() if m not in skipped}
    losses = {m: step() for m, step in steps.items()}
    shape = group["shape"]
    # a few seconds per step and more: fewer rounds
    large = shape["n"] * shape["groups"] * shape["entries"] >= 1 << 26
    timing = h.time_interleaved(steps, min(args.repeats, 3) if large else args.repeats)
    memory = {}
    if not args.no_memory:
        for m in group["memory"]:
            if m in steps:
                memory[m] = h.measure_peak(cases[m])
    rows = {}
    for m in group["methods"]:
        rows[m] = {
            "skipped": skipped.get(m),
            "median_s": timing.get(m, {}).get("median_s"),
            "min_s": timing.get(m, {}).get("min_s"),
            "times_s": timing.get(m, {}).get("times_s"),
            "cpu_median_s": timing.get(m, {}).get("cpu_median_s"),
            "cpu_times_s": timing.get(m, {}).get("cpu_times_s"),
            "peak_bytes": memory.get(m, {}).get("peak_bytes"),
            "loss": losses.get(m),
        }
    return {"label": group["label"], "shape": group["shape"], "methods": rows}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def print_group(res: Dict[str, Any]) -> None:
    rows = res["methods"]
    base = rows.get("fairseq_diversity", {})
    print(f"\n{res['label']}")
    print(
        f"  {'method':<22s} {'wall med':>10s} {'wall min':>10s} {'CPU med':>10s} {'peak mem':>11s}"
        f" {'CPU/fairseq':>12s} {'wall/fairseq':>13s} {'mem/fairseq':>12s}"
    )
    for m, r in rows.items():
        if r["skipped"]:
            print(f"  {m:<22s} skipped: {r['skipped']}")
            continue
        cells = [ratio(r[key], base.get(key)) for key in ("cpu_median_s", "median_s", "peak_bytes")]
        cells = ["-" if c is None else f"{c:.4f}" for c in cells]
        print(
            f"  {m:<22s} {h.fmt_s(r['median_s']):>10s} {h.fmt_s(r['min_s']):>10s} {h.fmt_s(r['cpu_median_s']):>10s}"
            f" {h.fmt_bytes(r['peak_bytes']):>11s} {cells[0]:>12s} {cells[1]:>13s} {cells[2]:>12s}"
        )


def derived(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Ratios of CPU-time medians ("cpu"), wall-clock medians ("wall") and peaks."""
    out: Dict[str, Any] = {"vs_fairseq": {}, "knn_overhead": {}, "naive_over_ours": {}, "naive_value_diff": {}}
    times = {"cpu": "cpu_median_s", "wall": "median_s"}
    for res in results:
        rows, label = res["methods"], res["label"]
        get = lambda m, key: rows.get(m, {}).get(key)  # noqa: E731
        if "fairseq_diversity" in rows:
            out["vs_fairseq"][label] = {
                m: {
                    **{basis: ratio(get(m, key), get("fairseq_diversity", key)) for basis, key in times.items()},
                    "peak_memory": ratio(get(m, "peak_bytes"), get("fairseq_diversity", "peak_bytes")),
                }
                for m in rows
                if m.startswith("ours")
            }
        if "ours_none" in rows:
            out["knn_overhead"][label] = {
                m: {
                    basis: None if (r := ratio(get(m, key), get("ours_none", key))) is None else r - 1.0
                    for basis, key in times.items()
                }
                for m in ("ours_knn_ce", "ours_knn_l2")
                if m in rows
            }
        if "naive_cdist_l2" in rows:
            out["naive_over_ours"][label] = {
                m: {basis: ratio(get("naive_cdist_l2", key), get(m, key)) for basis, key in times.items()}
                for m in ("regularizer_knn_ce", "regularizer_knn_l2")
            }
            a, b = get("naive_cdist_l2", "loss"), get("regularizer_knn_l2", "loss")
            out["naive_value_diff"][label] = None if a is None or b is None else abs(a - b)
    return out


def targets(d: Dict[str, Any], basis: str) -> List[Dict[str, Any]]:
    key = "wav2vec2 base N=8192"
    vs = d["vs_fairseq"].get(key, {}).get("ours_knn_ce", {})
    naive = [
        r["regularizer_knn_ce"][basis]
        for label, r in d["naive_over_ours"].items()
        if int(label.split(" M=")[1].split()[0]) >= 1024 and r["regularizer_knn_ce"][basis] is not None
    ]
    return [
        h.check(
            f"time ({basis}): ours KNN-CE / fairseq Gumbel+diversity (D=512 G=2 M=320 N=8192)",
            vs.get(basis),
            "<=",
            0.25,
        ),
        h.check("peak memory: ours KNN-CE / fairseq Gumbel+diversity (same shape)", vs.get("peak_memory"), "<=", 0.25),
        h.check(
            f"time ({basis}): KNN-CE term, extra over ours without regulariser (same shape)",
            d["knn_overhead"].get(key, {}).get("ours_knn_ce", {}).get(basis),
            "<=",
            0.15,
        ),
        h.check(
            f"time ({basis}): naive cdist(eye(M), P) / ours KNN-CE, smallest over M >= 1024",
            min(naive) if naive else None,
            ">=",
            10.0,
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the shapes the targets name (and N=2048), 7 rounds")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per group (default 9, quick 7; 3 for steps of 2**26 logits and more)",
    )
    parser.add_argument(
        "--time-basis",
        choices=["cpu", "wall"],
        default="cpu",
        help="which medians the targets compare (default cpu: this process's CPU time, "
        "which leaves out the time other processes held the cores)",
    )
    parser.add_argument(
        "--max-tensor-gib",
        type=float,
        default=3.0,
        help="skip a case whose largest single tensor is bigger than this (default 3)",
    )
    parser.add_argument(
        "--naive-max-entries",
        type=int,
        default=1024,
        help="largest M for the naive cdist form, which costs O(N * M^2) (default 1024)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory subprocesses")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the timings (default 1: on a shared machine, "
        "a thread descheduled inside a parallel region stalls the others and swamps "
        "the differences measured; 0: torch's default, all cores)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:N]; on a GPU the targets compare wall-clock medians"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/quantizer[_cuda][_quick].json)"
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 7 if args.quick else 9
    cuda = args.device.startswith("cuda")
    if not (cuda or args.device == "cpu"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    if cuda:
        # process CPU time says nothing about GPU work
        args.time_basis = "wall"
        torch.cuda.set_device(torch.device(args.device))
    name = "quantizer" + ("_cuda" if cuda else "") + ("_quick" if args.quick else "")
    out = args.out or os.path.join(h.HERE, "results", f"{name}.json")

    h.set_threads(args.threads)
    info = h.machine()
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
        print(f"GPU: {info['gpu']}")
    print(
        f"CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), fairseq {info['fairseq']}, load {info['load_average_1min_at_start']}"
    )
    # the calibration checks the resident-set method, which the GPU runs do not use
    calibration = None if args.no_memory or cuda else h.calibrate()
    if calibration:
        print(
            f"peak memory calibration: a {h.fmt_bytes(calibration['nominal_bytes'])} tensor measured as "
            f"{h.fmt_bytes(calibration['peak_bytes'])}"
        )
    start = time.time()
    results = []
    for group in shape_groups(args.quick):
        results.append(run_group(group, args))
        print_group(results[-1])
        sys.stdout.flush()
    d = derived(results)
    t = targets(d, args.time_basis)
    h.print_targets(t)
    other = "wall" if args.time_basis == "cpu" else "cpu"
    print(
        f"  (the same on {other} time: "
        + ", ".join(
            "-" if x["value"] is None else f"{x['value']:.3f}" for x in targets(d, other) if other in x["target"]
        )
        + ")"
    )
    h.write_json(
        out,
        {
            "command": "python benchmarks/bench_quantizer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": info,
            "repeats": args.repeats,
            "memory_calibration": calibration,
            "wall_seconds": time.time() - start,
            "time_basis": args.time_basis,
            "results": results,
            "ratios": d,
            "targets": t,
        },
    )
    print(f"\nwrote {os.path.relpath(out, h.REPO)}")
    return 0 if all(x["met"] is not False for x in t) else 1


if __name__ == "__main__":
    sys.exit(main())
