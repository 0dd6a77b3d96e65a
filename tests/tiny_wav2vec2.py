"""The tiny wav2vec 2.0 of the fairseq-layer tests: the stock and plugin models at one
small size, a seeded batch with explicit masks, and brute-force references of the KNN
loss of one quantizer call."""

import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq.data.data_utils import compute_mask_indices
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel
from fairseq_knnvq.quantization import knn as knn_loss_module
from references import brute_force_knn  # noqa: F401  (re-exported for the tests)

fairseq_knnvq.register_with_fairseq()

TINY = dict(
    conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] + [(32, 2, 2)]",
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=2,
    conv_pos=16,
    conv_pos_groups=16,
    latent_vars=16,
    latent_groups=2,
    final_dim=16,
    quantize_targets=True,
    num_negatives=10,
)
STOCK_LOG_KEYS = ["prob_perplexity", "code_perplexity", "temp"]
SAMPLES = 8000  # 0.5 s: 24 frames


def stock_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Wav2Vec2Model(Wav2Vec2Config(**{**TINY, **overrides}))


def knnvq_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Wav2Vec2KnnVqModel(Wav2Vec2KnnVqConfig(**{**TINY, **overrides}))


def built_knnvq_model(**options):
    """The plugin model at the TINY size through ``build_model`` from an OmegaConf config,
    as fairseq builds it: the path that runs the model's option checks."""
    from fairseq.dataclass.utils import merge_with_parent
    from omegaconf import OmegaConf

    cfg = merge_with_parent(Wav2Vec2KnnVqConfig(), OmegaConf.create({**TINY, **options}))
    return Wav2Vec2KnnVqModel.build_model(cfg)


def batch(model, batch_size=3, seed=0, padded_samples=0):
    """Audio, padding mask and fixed mask indices, all drawn from ``seed`` (fairseq main
    draws its masks from fresh OS entropy, so runs are compared on explicit masks)."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(batch_size, SAMPLES, generator=generator)
    padding_mask = None
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(SAMPLES)))
    frame_padding = None
    if padded_samples:
        padding_mask = torch.zeros(batch_size, SAMPLES, dtype=torch.bool)
        padding_mask[-1, SAMPLES - padded_samples :] = True
        source[padding_mask] = 0
        lengths = model._get_feat_extract_output_lengths((~padding_mask).long().sum(-1))
        frame_padding = torch.arange(frames).unsqueeze(0) >= lengths.unsqueeze(1)
    # seed/epoch/indices: fairseq's own per-utterance seeding of its mask generator (without
    # them it uses fresh OS entropy, and each test run would draw other masks)
    mask_indices = torch.from_numpy(
        compute_mask_indices(
            (batch_size, frames),
            frame_padding,
            0.65,
            5,
            min_masks=2,
            require_same_masks=True,
            seed=seed,
            epoch=0,
            indices=torch.arange(batch_size),
        )
    )
    return source, padding_mask, mask_indices


def sample_of(source, padding_mask, mask_indices):
    net_input = {"source": source, "mask_indices": mask_indices}
    if padding_mask is not None:
        net_input["padding_mask"] = padding_mask
    return {"id": torch.arange(source.shape[0]), "net_input": net_input}


def seeded(fn, seed=7):
    torch.manual_seed(seed)
    return fn()


def capture_quantizer_inputs(model):
    """Inputs (and masks) of every quantizer call, in call order."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach(), kwargs.get("mask")))

    for quantizer in model.smoothed_quantizers():
        quantizer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def knn_of_call(quantizer, call, k, distance="ce"):
    """The brute-force KNN loss of one quantizer call without Gumbel noise (softmax
    smoothing or eval): the rows are the valid frames' ``logits / temp``."""
    y, mask = call
    logits = quantizer.weight_proj(y).view(*y.shape[:2], quantizer.groups, quantizer.num_vars)
    rows = logits.reshape(-1, quantizer.groups, quantizer.num_vars)
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return brute_force_knn(rows / quantizer.curr_temp, k, distance)


def count_knn_searches(monkeypatch):
    """Counts the calls of the KNN neighbour search (one a loss, local or global)."""
    calls = [0]
    original = knn_loss_module.search_vertices

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(knn_loss_module, "search_vertices", counting)
    return calls


# --- parity with stock wav2vec 2.0 -------------------------------------------------
