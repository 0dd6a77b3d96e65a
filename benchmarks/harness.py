"""Shared pieces of the benchmarks: the measured steps, timing, peak memory, JSON.

A *case* is a plain dict (JSON-serialisable) naming a method and its shapes;
:func:`build_step` turns it into a function that runs one forward + backward pass on
inputs made once beforehand. The same case runs in this process for timing and in a
fresh subprocess for peak memory (``python benchmarks/harness.py peak '<case json>'``).

Peak memory on CPU. torch 2.13 has no CPU allocator statistics (``torch.cuda``'s
``max_memory_allocated`` has no CPU twin) and ``tracemalloc`` does not see tensor
storage, so the measurement is the resident set of a fresh process: build the inputs,
run the step once (libraries load, workspaces appear), then reset the kernel's
high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), run the step again
and read ``VmHWM`` from ``/proc/self/status``. The peak is ``VmHWM`` minus the resident
set just before the step: every byte the step touched at its peak, the inputs excluded.
glibc would otherwise keep freed blocks of up to 32 MiB for reuse (its mmap threshold
grows as blocks are freed), hiding them from the second run; the subprocess therefore
runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so every tensor of 64 KiB or more
is its own mapping and returns to the system when freed. A calibration case (a
256 MiB tensor filled and freed) checks the method on every run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # a clean clone runs these scripts without installing
    sys.path.insert(0, REPO)

from fairseq_knnvq.files import atomic_write_text  # noqa: E402
from fairseq_knnvq.quantization import KnnVertexLoss, SmoothedVectorQuantizer, knn_vertex_loss  # noqa: E402

TEMP = (2.0, 0.5, 0.999995)  # wav2vec 2.0 base
MiB = float(1 << 20)

# ---------------------------------------------------------------------------- cases


def case(method: str, n: int, dim: int, groups: int, entries: int, vq_dim: int, **extra) -> Dict[str, Any]:
    out = dict(method=method, n=n, dim=dim, groups=groups, entries=entries, vq_dim=vq_dim)
    out.update(extra)
    return out


def largest_tensor_bytes(c: Dict[str, Any]) -> int:
    """The largest single tensor a method makes: fairseq's N x G*M x d broadcast, the
    naive N x M distance matrix per group, else an N x G x M tensor of logits."""
    n, g, m, d = c["n"], c["groups"], c["entries"], c["vq_dim"] // c["groups"]
    if c["method"] == "fairseq_diversity":
        return 4 * n * g * m * d
    return 4 * n * g * m


def _ours(c: Dict[str, Any], regularizer: str, distance: str = "ce") -> SmoothedVectorQuantizer:
    return SmoothedVectorQuantizer(
        c["dim"],
        c["entries"],
        TEMP,
        c["groups"],
        False,
        c["vq_dim"],
        True,
        smoothing=c.get("smoothing", "gumbel_hard"),
        regularizer=regularizer,
        knn_k=c.get("k", 8),
        knn_distance=distance,
        knn_chunk_size=c.get("chunk_size"),
        track_knn_loss=False,
    )


def naive_cdist_knn(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The KNN-L2 loss written the obvious way: distances of every smoothed vector to
    an identity codebook, ``cdist(eye(M), P)``, O(N * M^2) per group."""
    n, groups, entries = logits.shape
    eye = torch.eye(entries, dtype=logits.dtype, device=logits.device)
    total = logits.new_zeros(())
    for g in range(groups):
        p = torch.softmax(logits[:, g], dim=-1)
        dist = torch.cdist(eye, p).pow(2)  # (M, N)
        total = total + dist.topk(k, dim=1, largest=False).values.sum()
    return total / (groups * entries * k)


def build_step(c: Dict[str, Any], seed: int = 0) -> Callable[[], float]:
    """Inputs and modules for case ``c``; returns a function that runs one forward +
    backward pass and returns the loss (a float, so the work cannot be skipped, and on a
    GPU the step has finished when it returns). ``c["device"]``: where it runs (default
    cpu); the inputs are drawn on the CPU and moved, so every device gets the same."""
    torch.manual_seed(seed)
    n, dim, groups, entries, vq_dim = c["n"], c["dim"], c["groups"], c["entries"], c["vq_dim"]
    device = torch.device(c.get("device", "cpu"))
    method = c["method"]
    k = c.get("k", 8)

    if method in ("regularizer_knn_ce", "regularizer_knn_l2", "naive_cdist_l2"):
        # the regulariser alone, on given logits (N, G, M)
        logits = (3.0 * torch.randn(n, groups, entries)).to(device).requires_grad_()

        def step() -> float:
            logits.grad = None
            if method == "naive_cdist_l2":
                loss = naive_cdist_knn(logits, k)
            else:
                loss = knn_vertex_loss(logits, k=k, distance=method[-2:], chunk_size=c.get("chunk_size"))
            loss.backward()
            return float(loss.detach())

        return step

    if method.startswith("softmax_smoothing"):
        # the bare smoothing: logits from a projection, p = softmax(l / tau), q = p C;
        # "_knn_ce" adds the KNN loss the way the quantizer does (KnnVertexLoss.with_softmax,
        # one autograd node), "_knn_ce_separate" as a second node (knn_vertex_loss)
        proj = torch.nn.Linear(dim, groups * entries).to(device)
        codebooks = torch.nn.Parameter(torch.rand(groups, entries, vq_dim // groups).to(device))
        x = torch.randn(n, dim).to(device)
        upstream = torch.randn(groups, n, vq_dim // groups).to(device)
        chunk = c.get("chunk_size")

        def step() -> float:
            for p in (proj.weight, proj.bias, codebooks):
                p.grad = None
            smoothed_logits = proj(x).view(n, groups, entries) / TEMP[0]
            knn = None
            if method == "softmax_smoothing_knn_ce":
                p, knn = KnnVertexLoss(k, "ce", chunk).with_softmax(smoothed_logits)
            else:
                p = F.softmax(smoothed_logits, dim=-1)
                if method == "softmax_smoothing_knn_ce_separate":
                    knn = knn_vertex_loss(smoothed_logits, k=k, distance="ce", chunk_size=chunk)
            loss = (torch.bmm(p.transpose(0, 1), codebooks) * upstream).sum()
            if knn is not None:
                loss = loss + knn
            del smoothed_logits, p, knn
            loss.backward()
            return float(loss.detach())

        return step

    if method.startswith("image_"):
        return build_image_step(c, seed)

    if method == "fairseq_diversity":
        from fairseq.modules import GumbelVectorQuantizer

        quantizer = GumbelVectorQuantizer(
            dim=dim,
            num_vars=entries,
            temp=TEMP,
            groups=groups,
            combine_groups=False,
            vq_dim=vq_dim,
            time_first=True,
        )
        key = None
    else:
        regularizer, _, distance = method.partition("_knn_")
        regularizer = {"ours_none": "none", "ours_diversity": "diversity", "ours": "knn"}[regularizer]
        quantizer = _ours(c, regularizer, distance or "ce")
        quantizer.set_num_updates(c.get("num_updates", 0))  # tau = the schedule's at that update
        key = {"none": None, "diversity": "diversity_loss", "knn": "knn_loss"}[regularizer]
    quantizer.to(device).train()
    x = torch.randn(1, n, dim).to(device)
    upstream = torch.randn(1, n, vq_dim).to(device)

    def step() -> float:
        quantizer.zero_grad(set_to_none=True)
        out = quantizer(x)
        loss = (out["x"] * upstream).sum()
        if method == "fairseq_diversity":
            # wav2vec 2.0's get_extra_losses: (G*M - prob_perplexity) / (G*M)
            loss = loss + (out["num_vars"] - out["prob_perplexity"]) / out["num_vars"]
        elif key is not None:
            loss = loss + out[key]
        del out
        loss.backward()
        return float(loss.detach())

    return step


class BareSmoothing(torch.nn.Module):
    """The least a smoothed quantizer computes, as a drop-in for the image model's
    quantizer: logits ``l = W z``, ``p = softmax((l + g) / tau)`` (``gumbel``) or
    ``softmax(l / tau)``, ``q = p C``; its ``targets`` are ``argmax p`` (no gradient)."""

    def __init__(self, dim: int, entries: int, tau: float, smoothing: str):
        super().__init__()
        self.weight_proj = torch.nn.Linear(dim, entries)
        self.vars = torch.nn.Parameter(torch.rand(entries, dim))
        self.tau, self.smoothing = tau, smoothing

    def forward(self, x: torch.Tensor, produce_targets: bool = True) -> Dict[str, Any]:
        bsz, tsz, dim = x.shape
        logits = self.weight_proj(x.reshape(-1, dim))
        if self.smoothing == "gumbel":
            logits = logits - torch.empty_like(logits).exponential_().log()
        p = F.softmax(logits / self.tau, dim=-1)
        del logits
        return {"x": (p @ self.vars).view(bsz, tsz, -1), "targets": p.detach().argmax(-1).view(bsz, tsz, 1)}


def build_image_step(c: Dict[str, Any], seed: int = 0) -> Callable[[], float]:
    """One training step of ``vq_image_autoencoder`` (encoder, quantizer, decoder; MSE
    reconstruction plus 0.1 x the quantizer's training losses, as the ImageNet configs
    weigh them), on ``c["batch"]`` random images of ``c["image_size"]`` pixels.

    ``image_ours_<regularizer>``: the model as built from the config;
    ``image_bare``: the same model with :class:`BareSmoothing` in place of its quantizer.
    """
    from fairseq_knnvq.models.vq_image_autoencoder import VQImageAutoencoder, VQImageAutoencoderConfig

    torch.manual_seed(seed)
    method = c["method"]
    regularizer = "none" if method == "image_bare" else method[len("image_ours_") :].replace("knn_ce", "knn")
    cfg = VQImageAutoencoderConfig(
        channels=c.get("channels", 128),
        max_channels=c.get("max_channels", 512),
        num_res_blocks=c.get("num_res_blocks", 2),
        code_dim=c["dim"],
        downsample_factor=c["downsample_factor"],
        latent_vars=c["entries"],
        quantizer="smoothed",
        smoothing=c.get("smoothing", "gumbel"),
        regularizer=regularizer,
        knn_distance="ce",
        knn_k=c.get("k", 8),
        knn_global=False,
    )
    model = VQImageAutoencoder(cfg)
    model.quantizer.track_knn_loss = False  # only the training losses, as in bench_memory
    if method == "image_bare":
        model.quantizer = BareSmoothing(c["dim"], c["entries"], TEMP[0], str(cfg.smoothing))
    model.train()
    size = c["image_size"]
    images = torch.rand(c["batch"], 3, size, size) * 2 - 1

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(images)
        loss = F.mse_loss(out["x"], images)
        for key in out["training_losses"] if method != "image_bare" else ():
            loss = loss + 0.1 * out[key]
        del out
        loss.backward()
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------- timing


def time_interleaved(steps: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, Dict[str, Any]]:
    """Runs every step once to warm up, then ``repeats`` rounds in which each step runs
    once in turn, so that a slow spell of the machine hits all of them alike. Records
    wall-clock time and this process's CPU time (``time.process_time``: all threads,
    excluding the time other processes held the cores)."""
    for step in steps.values():
        step()
    wall: Dict[str, List[float]] = {name: [] for name in steps}
    cpu: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_s": statistics.median(wall[name]),
            "min_s": min(wall[name]),
            "times_s": wall[name],
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_times_s": cpu[name],
        }
        for name in steps
    }


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def measure_peak_here(c: Dict[str, Any]) -> Dict[str, Any]:
    """Run in the subprocess: peak resident bytes of one forward + backward of ``c``."""
    if c["method"] == "calibration":

        def step() -> float:
            t = torch.empty(int(c["bytes"]) // 4).fill_(1.0)
            return float(t[0])
    else:
        step = build_step(c)
    step()
    if c.get("device", "cpu").startswith("cuda"):
        # on a GPU: the allocator's peak above what the inputs and modules hold
        device = torch.device(c["device"])
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before_gpu = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - before_gpu
        return {"peak_bytes": peak, "rss_before_bytes": before_gpu, "seconds": seconds}
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"peak_bytes": (peak - before) * 1024, "rss_before_bytes": before * 1024, "seconds": seconds}


def measure_peak(c: Dict[str, Any], timeout: float = 900.0) -> Dict[str, Any]:
    """Peak memory of case ``c`` in a fresh Python process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "harness.py"), "peak", json.dumps(c)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak memory run of {c} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def calibrate() -> Dict[str, Any]:
    nominal = 256 * (1 << 20)
    got = measure_peak({"method": "calibration", "bytes": nominal})
    got["nominal_bytes"] = nominal
    return got


# ---------------------------------------------------------------------------- report


def set_threads(threads: int) -> None:
    """``threads`` > 0: that many intra-op threads; 0: torch's default (all cores)."""
    if threads > 0:
        torch.set_num_threads(threads)


def machine() -> Dict[str, Any]:
    try:
        import fairseq

        fairseq_version = fairseq.__version__
    except Exception:  # fairseq is optional for the memory benchmark
        fairseq_version = None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fairseq": fairseq_version,
        "python": platform.python_version(),
        "load_average_1min_at_start": load,
    }


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Writes at once (:func:`fairseq_knnvq.files.atomic_write_text`), so a killed run
    leaves no half-written JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def fmt_bytes(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / MiB:,.0f} MiB"


def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def check(name: str, value: Optional[float], op: str, limit: float) -> Dict[str, Any]:
    met = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"target": name, "value": value, "op": op, "limit": limit, "met": met}


def print_targets(targets: List[Dict[str, Any]]) -> None:
    print("\nTargets")
    for t in targets:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "MET", False: "MISSED", None: "-"}[t["met"]]
        print(f"  {t['target']:<72s} {value:>12s} {t['op']} {t['limit']:<6} {verdict}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "peak":
        print(json.dumps(measure_peak_here(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python benchmarks/harness.py peak '<case json>'")
