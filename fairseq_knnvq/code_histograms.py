"""The codes a pretraining checkpoint's own quantizer chooses for some audio, counted,
plotted and written as JSON: the library of ``knnvq-report codes`` (the command line is
:mod:`fairseq_knnvq.cli.report`), also used by the demo.

:func:`quantizer_usage` is ``Wav2Vec2Model.quantize`` (feature extractor, layer norm,
quantizer) keeping the quantizer's whole output, so the counts are those of the model's
own quantizer in evaluation mode (hard argmax codes). Files are written through
:mod:`fairseq_knnvq.files`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from .files import atomic_write_text
from .preparation.manifest import ManifestError, read_manifest
from .quantization import CodeUsage, count_codes
from .report import ReportError, pyplot, save_figure


@torch.no_grad()
def quantizer_usage(model: torch.nn.Module, source: torch.Tensor) -> Tuple[CodeUsage, int]:
    """The usage sums (on the CPU) of the codes that a wav2vec 2.0 model's quantizer
    chooses for the audio ``source`` (1, samples), and the number of frames.

    This plugin's quantizer returns its ``usage_sums``; fairseq's
    ``GumbelVectorQuantizer`` returns none, so its ``targets`` are counted."""
    quantizer = model.quantizer
    features = model.feature_extractor(source).transpose(1, 2)
    result = quantizer(model.layer_norm(features), produce_targets=True)
    usage = result.get("usage_sums")
    if usage is None:
        usage = CodeUsage(counts=count_codes(result["targets"].reshape(-1, quantizer.groups), quantizer.num_vars))
    usage = CodeUsage(**{name: (None if value is None else value.cpu()) for name, value in vars(usage).items()})
    return usage, features.shape[1]


def load_pretrained(checkpoint: Path):
    """(model in eval mode, its training config) of a pretraining checkpoint of this
    plugin or of stock wav2vec 2.0."""
    from .checkpoints import CheckpointError, load_model

    try:
        model, cfg, _task = load_model(checkpoint)
    except CheckpointError as e:
        raise ReportError(
            f"cannot load {checkpoint} as a fairseq checkpoint: {e.detail}" if e.detail else str(e)
        ) from e
    if getattr(model, "quantizer", None) is None or not hasattr(model, "feature_extractor"):
        raise ReportError(
            f"{checkpoint} has no quantizer: pass a wav2vec 2.0 pretraining checkpoint "
            "(fine-tuning removes the quantizer)"
        )
    return model, cfg


def count_codes_in_audio(model, cfg, files: Sequence[Path]):
    """The model's own quantizer (eval mode: hard argmax codes) over each file
    (:func:`quantizer_usage`); returns the summed
    :class:`~fairseq_knnvq.quantization.CodeUsage` and the number of frames."""
    import soundfile
    import torch
    import torch.nn.functional as F

    from .checkpoints import min_input_samples

    sample_rate = int(getattr(cfg.task, "sample_rate", 16000))
    normalize = bool(getattr(cfg.task, "normalize", False))
    min_samples = min_input_samples(model)
    total = None
    frames = 0
    for path in files:
        try:
            wav, sr = soundfile.read(str(path), dtype="float32")
        except Exception as e:
            raise ReportError(f"cannot read audio {path}: {e}") from e
        if sr != sample_rate or wav.ndim != 1:
            raise ReportError(
                f"{path}: {sr} Hz, {wav.ndim} dim; the model was trained on {sample_rate} Hz mono "
                "audio: convert it (knnvq-manifest --resample)"
            )
        if wav.shape[0] < min_samples:
            raise ReportError(
                f"{path} is too short for the model's feature extractor: {wav.shape[0]} samples, "
                f"the receptive field is {min_samples}"
            )
        source = torch.from_numpy(wav).unsqueeze(0)
        if normalize:  # as fairseq's FileAudioDataset does for such models
            source = F.layer_norm(source, source.shape)
        usage, num_frames = quantizer_usage(model, source)
        total = usage if total is None else total + usage
        frames += num_frames
    return total, frames


def plot_code_counts(counts, path: Path, title: str) -> None:
    """Bars of the per-entry counts of each group, sorted, with the uniform level."""
    from .quantization import codebook_stats

    plt = pyplot()
    groups, entries = counts.shape
    fig, axes = plt.subplots(groups, 1, figsize=(6.4, 2.6 * groups), squeeze=False)
    try:
        for g in range(groups):
            ax = axes[g, 0]
            row = counts[g]
            stats = codebook_stats(row.reshape(1, -1))
            ax.bar(range(entries), sorted(row.tolist(), reverse=True), width=1.0, color=f"C{g}")
            ax.axhline(float(row.sum()) / entries, color="k", linestyle="--", linewidth=0.8, label="uniform use")
            ax.set_title(
                f"group {g}: {int(stats['used_codes'])}/{entries} entries used, "
                f"code perplexity {stats['code_perplexity']:.1f}",
                fontsize="medium",
            )
            ax.set_ylabel("frames")
            ax.legend(fontsize="small")
        axes[-1, 0].set_xlabel("entries, most used first")
        fig.suptitle(title)
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)


def write_code_report(
    checkpoint: Path, manifest: Path, out: Path, name: Optional[str] = None, max_files: Optional[int] = None
) -> Dict[str, object]:
    """Writes ``<name>_code_counts.png`` and ``<name>_code_counts.json`` under ``out``;
    returns the JSON content (counts and :func:`codebook_stats`)."""
    from .quantization import codebook_stats

    try:
        files = [entry.source_path for entry in read_manifest(manifest).entries]
    except ManifestError as e:
        raise ReportError(str(e)) from None
    if not files:
        raise ReportError(f"manifest {manifest} lists no audio files")
    if max_files is not None:
        files = files[:max_files]
    model, cfg = load_pretrained(checkpoint)
    usage, frames = count_codes_in_audio(model, cfg, files)
    name = name or Path(checkpoint).resolve().parent.parent.name or "model"
    stats = codebook_stats(usage)
    per_group = [codebook_stats(usage.counts[g].reshape(1, -1)) for g in range(usage.groups)]
    report = {
        "name": name,
        "checkpoint": str(checkpoint),
        "manifest": str(manifest),
        "files": len(files),
        "frames": frames,
        # fairseq sets the checkpoint's update count on load, so this is the trained
        # temperature, the one tightness is measured at (softmax(logits / temp)).
        "temperature": float(getattr(model.quantizer, "curr_temp", float("nan"))),
        "groups": usage.groups,
        "num_vars": usage.num_vars,
        "stats": stats,
        "per_group": per_group,
        "counts": usage.counts.tolist(),
    }
    out = Path(out)
    plot_code_counts(
        usage.counts, out / f"{name}_code_counts.png", f"{name}: codes of {frames} frames ({Path(manifest).name})"
    )
    atomic_write_text(out / f"{name}_code_counts.json", json.dumps(report, indent=2) + "\n")
    return report
