"""The paper's Figure 1 in miniature: smoothed vectors on the 2-simplex under each regulariser.

N = 300 points p_n = softmax(l_n) on the simplex of M = 3 entries, with free logits l_n
started near the centre, are optimised with Adam on minibatches of B points drawn afresh
each step, under (a) no regulariser, (b) the wav2vec 2.0 diversity loss, (c) KNN-L2 and
(d) KNN-CE with K = 8; an extra run uses KNN-CE on the full batch (B = N).

Expected: KNN pushes the points onto all three vertices; the diversity loss leaves them
near the centre (it is already satisfied there, and its gradient vanishes); full-batch
KNN only moves the K * M selected points, so the regulariser works through changing
minibatches.

    python examples/simplex_toy.py --out toy_out        # table + toy_out/simplex_toy.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from fairseq_knnvq.quantization import diversity_loss, knn_vertex_loss

NEAR_VERTEX = 0.1  # a point "sits on" a vertex when ||e_m - p|| <= this


@dataclass
class Variant:
    name: str
    loss: Optional[Callable[[torch.Tensor], torch.Tensor]]
    batch_size: int


def variants(num_points: int, batch_size: int, k: int) -> List[Variant]:
    return [
        Variant("(a) none", None, batch_size),
        Variant("(b) diversity", diversity_loss, batch_size),
        Variant(f"(c) KNN-L2, K={k}", lambda logits: knn_vertex_loss(logits, k=k, distance="l2"), batch_size),
        Variant(f"(d) KNN-CE, K={k}", lambda logits: knn_vertex_loss(logits, k=k, distance="ce"), batch_size),
        Variant(f"KNN-CE, K={k}, full batch", lambda logits: knn_vertex_loss(logits, k=k, distance="ce"), num_points),
    ]


def optimise(variant: Variant, init: torch.Tensor, steps: int, lr: float, seed: int) -> torch.Tensor:
    logits = init.clone().requires_grad_()
    if variant.loss is None:
        return logits.detach()
    optimiser = torch.optim.Adam([logits], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randperm(init.shape[0], generator=generator)[: variant.batch_size]
        optimiser.zero_grad()
        variant.loss(logits[batch]).backward()
        optimiser.step()
    return logits.detach()


def summarise(logits: torch.Tensor, k: int) -> Dict[str, float]:
    p = torch.softmax(logits, dim=-1)
    vertices = torch.eye(p.shape[-1])
    dist = torch.cdist(p, vertices)  # (N, M) Euclidean distance to each vertex
    near = dist <= NEAR_VERTEX
    return {
        "mean_max_p": float(p.max(-1).values.mean()),
        "share_near_vertex": float(near.any(-1).float().mean()),
        "vertices_covered": int((near.sum(0) >= k).sum()),
    }


def to_plane(p: torch.Tensor):
    """Barycentric -> 2-D coordinates of an equilateral triangle."""
    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    xy = p @ corners
    return xy[:, 0].numpy(), xy[:, 1].numpy()


def plot(results: Dict[str, torch.Tensor], init: torch.Tensor, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install 'fairseq-knnvq[plots]'")
    panels = list(results.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    outline = to_plane(torch.eye(3)[[0, 1, 2, 0]])
    start = to_plane(torch.softmax(init, -1))
    for ax, (name, logits) in zip(axes, panels):
        ax.plot(*outline, color="black", linewidth=1)
        ax.scatter(*start, s=4, color="lightgray", label="start")
        ax.scatter(*to_plane(torch.softmax(logits, -1)), s=6, color="tab:blue", label="end")
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.axis("off")
    axes[0].legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path) or ".", suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    os.replace(tmp.name, path)
    plt.close(fig)


def run(num_points=300, batch_size=48, k=8, steps=3000, lr=0.05, init_scale=0.1, seed=0):
    if k < 1 or batch_size < 1 or num_points < 1 or steps < 0:
        raise ValueError("k, batch size, points must be >= 1 and steps >= 0")
    init = init_scale * torch.randn(num_points, 3, generator=torch.Generator().manual_seed(seed))
    results, table = {}, {}
    for variant in variants(num_points, batch_size, k):
        logits = optimise(variant, init, steps, lr, seed)
        results[variant.name] = logits
        table[variant.name] = summarise(logits, k)
    return init, results, table


def format_table(table: Dict[str, Dict[str, float]], k: int) -> str:
    lines = [
        f"| variant | mean max p | share within {NEAR_VERTEX} of a vertex | vertices with >= {k} such points |",
        "|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['mean_max_p']:.3f} | {row['share_near_vertex']:.3f} | {row['vertices_covered']}/3 |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for simplex_toy.png and simplex_toy.json")
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    init, results, table = run(args.points, args.batch_size, args.k, args.steps, args.lr, seed=args.seed)
    print(format_table(table, args.k))
    with tempfile.NamedTemporaryFile("w", dir=args.out, suffix=".json", delete=False) as tmp:
        json.dump({"args": vars(args), "results": table}, tmp, indent=2)
    os.replace(tmp.name, os.path.join(args.out, "simplex_toy.json"))
    if not args.no_plot:
        plot(results, init, os.path.join(args.out, "simplex_toy.png"))
        print(f"wrote {os.path.join(args.out, 'simplex_toy.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
