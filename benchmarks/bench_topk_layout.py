"""The neighbour search's top-k over rows in each layout, side by side.

    python benchmarks/bench_topk_layout.py                  # on the CPU, one thread
    python benchmarks/bench_topk_layout.py --device cuda    # on a GPU

:func:`~fairseq_knnvq.quantization.vertex_search.topk_along_rows` takes the K largest
of every column of ``(N, G, C)`` scores (one chunk of the KNN search), in one of two
layouts (:data:`~fairseq_knnvq.quantization.vertex_search.TOPK_LAYOUTS`):

- ``blocked``: a few columns at a time copied into a contiguous block, top-k along its
  first axis (the CPU's default);
- ``rows_last``: one copy to ``(G, C, N)``, top-k along the last, contiguous axis (the
  default on a GPU, where a top-k along dim 0 reads every slice G*C values apart);

and ``torch.topk(score, k, dim=0)`` as it is, for reference. Shapes: wav2vec 2.0 BASE
per GPU (2,100 masked frames, G=2, M=320), and the search of the image recipes' batches at
f16 / M=1024 (in one piece) and f8 / M=16384 (one chunk of 64 MiB of scores). Checks that every layout gives
the values of ``torch.topk`` (and the same indices: random scores have no ties), prints
a table and writes JSON to ``benchmarks/results/topk_layout[_cuda].json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

import torch

import harness as h
from fairseq_knnvq.quantization.vertex_search import TOPK_LAYOUTS, topk_along_rows

# rows per GPU: wav2vec 2.0 BASE's masked frames (docs: about 2,100); the image
# recipes' batches (f16: 32 images of 16 x 16 positions, the whole search in one piece;
# f8: 16 images of 32 x 32 positions, one chunk of 2**24 / N = 1,024 vertices)
SHAPES = [
    dict(label="wav2vec2 BASE per GPU", n=2100, groups=2, columns=320),
    dict(label="image f16 M=1024 (whole search)", n=8192, groups=1, columns=1024),
    dict(label="image f8 M=16384 (one chunk)", n=16384, groups=1, columns=1024),
]
QUICK_SHAPES = [dict(label="small", n=2048, groups=2, columns=256)]


def run_shape(shape: Dict[str, Any], k: int, device: str, repeats: int, seed: int = 0) -> Dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(seed)
    score = torch.randn(shape["n"], shape["groups"], shape["columns"], generator=gen, device=device)
    reference = torch.topk(score, k, dim=0, sorted=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    results: Dict[str, Any] = {}
    steps = {}
    for layout in TOPK_LAYOUTS:
        values, indices = topk_along_rows(score, k, layout=layout)
        results[layout] = {
            "values_equal": bool(torch.equal(values, reference.values)),
            "indices_equal": bool(torch.equal(indices, reference.indices)),
        }

        def step(layout=layout) -> float:
            topk_along_rows(score, k, layout=layout)
            sync()
            return 0.0

        steps[layout] = step

    def plain() -> float:
        torch.topk(score, k, dim=0, sorted=True)
        sync()
        return 0.0

    steps["torch.topk(dim=0)"] = plain
    timing = h.time_interleaved(steps, repeats)
    for name, t in timing.items():
        results.setdefault(name, {})["median_s"] = t["median_s"]
        results[name]["times_s"] = t["times_s"]
    return {**shape, "k": k, "results": results}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--k", type=int, default=8, help="neighbours per vertex (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per layout (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: all cores; default 1)")
    parser.add_argument("--quick", action="store_true", help="one small shape (a smoke test)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/topk_layout[_cuda].json)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.k < 1 or args.repeats < 1:
        parser.error("--k and --repeats must be >= 1")
    h.set_threads(args.threads)
    out = args.out or os.path.join(
        h.HERE, "results", "topk_layout" + ("_cuda" if args.device.startswith("cuda") else "") + ".json"
    )
    rows = [run_shape(s, args.k, args.device, args.repeats) for s in (QUICK_SHAPES if args.quick else SHAPES)]
    names = list(TOPK_LAYOUTS) + ["torch.topk(dim=0)"]
    print(f"top-{args.k} over rows on {args.device} (medians of {args.repeats}); values / indices equal to torch.topk")
    print(f"{'shape':34s} {'N x G x C':>18s} " + " ".join(f"{n:>18s}" for n in names) + "  equal")
    ok = True
    for r in rows:
        dims = f"{r['n']} x {r['groups']} x {r['columns']}"
        times = " ".join(f"{h.fmt_s(r['results'][n]['median_s']):>18s}" for n in names)
        equal = all(r["results"][x]["values_equal"] and r["results"][x]["indices_equal"] for x in TOPK_LAYOUTS)
        ok = ok and equal
        print(f"{r['label']:34s} {dims:>18s} {times}  {equal}")
    h.write_json(out, {"device": args.device, "machine": h.machine(), "shapes": rows, "all_equal": ok})
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
