"""One wav2vec 2.0 BASE training step end to end: the plugin against stock fairseq.

    python benchmarks/bench_step.py                     # 2 x 10 s of audio, 3 timed rounds
    python benchmarks/bench_step.py --device cuda --batch 8 --seconds 15 --precision fp16

A step is what fairseq's ``task.train_step`` does per batch minus the optimizer: the
criterion's forward (model forward, contrastive loss, extra losses) and the backward
pass. Two variants, built from the shipped configs:

- ``stock``: fairseq's ``wav2vec2`` model with its ``GumbelVectorQuantizer`` and the
  ``wav2vec`` criterion with the diversity loss, as in fairseq's
  ``wav2vec2_base_librispeech.yaml`` (``loss_weights: [0.1, 10]``);
- ``plugin``: ``wav2vec2_knnvq`` with KNN-CE and the ``wav2vec_knnvq`` criterion, as in
  ``configs/pretraining/base_knn_ce.yaml`` (the same model otherwise).

Both get the same audio, the same explicit time masks (fairseq's ``compute_mask_indices``
with the config's mask_prob 0.65 and mask_length 10, seeded) and the same seeds before
every step (layer drop and negatives draw alike). Time: interleaved rounds in one
process after a warm-up step each, medians of wall-clock and (on CPU) this process's CPU
time. Peak memory: each variant in a fresh process (on CPU the resident-set high-water
mark above the inputs and the model, measured as ``harness.py`` does; on CUDA
``torch.cuda.max_memory_allocated`` above what is allocated before the step).

``--precision fp16`` / ``bf16`` puts the model and the audio in that dtype, which is what
fairseq's ``common.fp16`` / ``common.bf16`` do (``torch.autocast`` over the whole model is
not an option: stock wav2vec 2.0's ``apply_mask`` then writes the float32 mask embedding
into half-precision features, which raises in ``index_put``).

Prints a table with the ratios plugin / stock and writes
``benchmarks/results/step[_cuda].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict

import numpy as np
import torch

import harness as h

VARIANTS = ("stock", "plugin")
STOCK_YAML = ("examples", "wav2vec", "config", "pretraining", "wav2vec2_base_librispeech.yaml")
PLUGIN_YAML = os.path.join(h.REPO, "configs", "pretraining", "base_knn_ce.yaml")
SAMPLE_RATE = 16000


def _yaml_sections(path: str):
    """The model and criterion of a config file, merged with the recipe file that its
    ``defaults`` list names (the plugin's variants; fairseq's file lists none)."""
    from omegaconf import OmegaConf

    own = OmegaConf.load(path)
    names = own.pop("defaults", ["_self_"])
    folder = os.path.dirname(path)
    cfg = OmegaConf.merge(
        *(own if name == "_self_" else OmegaConf.load(os.path.join(folder, f"{name}.yaml")) for name in names)
    )
    return cfg.model, cfg.criterion


def build(variant: str, device: str):
    """(model, criterion) of ``variant`` in training mode, on ``device``."""
    import fairseq
    from fairseq.dataclass.utils import merge_with_parent

    if variant == "stock":
        from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion
        from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

        model_cfg, crit_cfg = _yaml_sections(os.path.join(os.path.dirname(fairseq.__file__), *STOCK_YAML))
        model = Wav2Vec2Model(merge_with_parent(Wav2Vec2Config(), model_cfg))
        criterion = Wav2vecCriterion(
            None, infonce=crit_cfg.infonce, loss_weights=list(crit_cfg.loss_weights), log_keys=list(crit_cfg.log_keys)
        )
    elif variant == "plugin":
        import fairseq_knnvq

        fairseq_knnvq.register_with_fairseq()
        from fairseq_knnvq.criterions.wav2vec_knnvq import Wav2vecKnnVqCriterion
        from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel

        model_cfg, crit_cfg = _yaml_sections(PLUGIN_YAML)
        model = Wav2Vec2KnnVqModel(merge_with_parent(Wav2Vec2KnnVqConfig(), model_cfg))
        criterion = Wav2vecKnnVqCriterion(
            None,
            infonce=crit_cfg.infonce,
            loss_weights=list(crit_cfg.loss_weights),
            log_keys=list(crit_cfg.log_keys),
            knn_weight=crit_cfg.knn_weight,
        )
        if model.cfg.regularizer != "knn" or model.cfg.knn_distance != "ce":
            raise RuntimeError(f"{PLUGIN_YAML} is expected to be the KNN-CE variant")
    else:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    model.to(device).train()
    return model, criterion


def make_sample(model, batch: int, seconds: float, device: str, dtype: torch.dtype, seed: int = 0) -> Dict[str, Any]:
    from fairseq.data.data_utils import compute_mask_indices

    generator = torch.Generator().manual_seed(seed)
    samples = int(seconds * SAMPLE_RATE)
    source = torch.randn(batch, samples, generator=generator)
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(samples)))
    np.random.seed(seed)
    mask_indices = compute_mask_indices(
        (batch, frames), None, model.mask_prob, model.mask_length, min_masks=2, require_same_masks=True
    )
    net_input = {"source": source.to(device, dtype), "mask_indices": torch.from_numpy(mask_indices).to(device)}
    return {"id": torch.arange(batch), "net_input": net_input}


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_step(variant: str, args):
    model, criterion = build(variant, args.device)
    dtype = DTYPES[args.precision]
    sample = make_sample(model, args.batch, args.seconds, args.device, dtype)
    model.to(dtype)

    def step(seed: int = 1) -> float:
        torch.manual_seed(seed)
        np.random.seed(seed)
        model.zero_grad(set_to_none=True)
        loss, _, _ = criterion(model, sample)
        loss.backward()
        return float(loss.detach())  # waits for the device

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak_here(variant: str, args) -> Dict[str, Any]:
    """In a fresh process: the peak memory of one step, above the model and inputs."""
    step = make_step(variant, args)
    loss = step()  # warm-up: libraries load, workspaces and gradients appear
    if args.device.startswith("cuda"):
        device = torch.device(args.device)
        sync(args.device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(args.device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before, "loss": loss}
    before = h._status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return {"peak_bytes": (h._status_kib("VmHWM") - before) * 1024, "loss": loss}


def measure_peak(variant: str, args) -> Dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--peak-of",
        variant,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--seconds",
        str(args.seconds),
        "--threads",
        str(args.threads),
        "--precision",
        args.precision,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak memory run of {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_steps(args) -> Dict[str, Dict[str, Any]]:
    steps = {variant: make_step(variant, args) for variant in VARIANTS}
    losses = {variant: step() for variant, step in steps.items()}  # warm-up
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for round_ in range(args.repeats):
        for variant, step in steps.items():
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step(seed=2 + round_)
            sync(args.device)
            wall[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
    return {
        v: {
            "median_s": statistics.median(wall[v]),
            "times_s": wall[v],
            "cpu_median_s": statistics.median(cpu[v]),
            "cpu_times_s": cpu[v],
            "warmup_loss": losses[v],
        }
        for v in VARIANTS
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--batch", type=int, default=2, help="utterances per batch (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of audio per utterance (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1, as the other benchmarks; 0: all cores)",
    )
    parser.add_argument(
        "--precision",
        choices=sorted(DTYPES),
        default="fp32",
        help="dtype of the model and the audio, as fairseq's common.fp16 / common.bf16 (default fp32)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory subprocesses")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step[_cuda].json)")
    parser.add_argument("--peak-of", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.seconds < 1.0:
        parser.error("--seconds must be >= 1 (the time masks need enough frames)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    if not args.device.startswith(("cpu", "cuda")):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    h.set_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    if args.peak_of:
        print(json.dumps(measure_peak_here(args.peak_of, args)))
        return 0

    info = h.machine()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    print(
        f"{info.get('gpu', info['cpu'])}; torch {info['torch']} ({info['torch_threads']} CPU threads), "
        f"fairseq {info['fairseq']}, load {info['load_average_1min_at_start']}"
    )
    print(
        f"one BASE step: {args.batch} x {args.seconds:g} s of audio, device {args.device}, precision {args.precision}"
    )
    start = time.time()
    timing = time_steps(args)
    memory = {} if args.no_memory else {v: measure_peak(v, args) for v in VARIANTS}
    ratios = {
        "wall": timing["plugin"]["median_s"] / timing["stock"]["median_s"],
        "cpu": timing["plugin"]["cpu_median_s"] / timing["stock"]["cpu_median_s"],
        "peak_memory": None if not memory else memory["plugin"]["peak_bytes"] / memory["stock"]["peak_bytes"],
    }
    print(f"\n  {'variant':<8s} {'wall med':>10s} {'CPU med':>10s} {'peak mem':>11s}")
    for v in VARIANTS:
        print(
            f"  {v:<8s} {h.fmt_s(timing[v]['median_s']):>10s} {h.fmt_s(timing[v]['cpu_median_s']):>10s}"
            f" {h.fmt_bytes(memory.get(v, {}).get('peak_bytes')):>11s}"
        )
    print(
        "  plugin / stock: wall {wall:.3f}, CPU {cpu:.3f}, peak memory {mem}".format(
            wall=ratios["wall"],
            cpu=ratios["cpu"],
            mem="-" if ratios["peak_memory"] is None else f"{ratios['peak_memory']:.3f}",
        )
    )
    out = args.out or os.path.join(
        h.HERE, "results", "step_cuda.json" if args.device.startswith("cuda") else "step.json"
    )
    h.write_json(
        out,
        {
            "command": "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": info,
            "batch": args.batch,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "device": args.device,
            "precision": args.precision,
            "wall_seconds": time.time() - start,
            "timing": timing,
            "memory": memory,
            "ratios_plugin_over_stock": ratios,
        },
    )
    print(f"\nwrote {os.path.relpath(out, h.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
