"""Decoding does not depend on the batch: a short utterance padded into a batch with a
long one gets the encoder output it gets alone, for wav2vec 2.0's group-norm (the
default, BASE) and layer-norm feature encoders. The reference is fairseq's own model on
the utterance alone (no padding); without the plugin's per-utterance first block the
group-norm model's output moves (the check that the test can fail)."""

import pytest
import torch

from fairseq_knnvq.evaluation.speech import group_norm_feature_extractors, padding_blind_features
from tiny_wav2vec2 import stock_model

LONG, SHORT = 16000, 9000


def encoder_outputs(model, lengths, blind: bool):
    """Frames of each utterance (without padding) from one padded batch."""
    torch.manual_seed(1)
    audio = torch.randn(len(lengths), max(lengths))
    padding = torch.zeros(audio.shape, dtype=torch.bool)
    for row, n in enumerate(lengths):
        audio[row, n:] = 0.0
        padding[row, n:] = True
    with torch.inference_mode(), padding_blind_features(model, lengths if blind else None):
        out = model(audio, padding_mask=padding, mask=False, features_only=True)
    frames = out["x"]
    mask = out["padding_mask"]
    return [frames[row][~mask[row]] if mask is not None else frames[row] for row in range(len(lengths))]


def alone(model, length):
    torch.manual_seed(1)
    audio = torch.randn(2, LONG)  # the same random draw as the batch, row 1
    with torch.inference_mode():
        return model(audio[1:2, :length], padding_mask=None, mask=False, features_only=True)["x"][0]


@pytest.mark.parametrize("mode", ["default", "layer_norm"])
def test_padded_utterance_gets_its_own_output(mode):
    model = stock_model(extractor_mode=mode).eval()
    batched = encoder_outputs(model, [LONG, SHORT], blind=True)
    reference = alone(model, SHORT)
    assert batched[1].shape == reference.shape
    assert torch.allclose(batched[1], reference, atol=1e-5, rtol=0), (batched[1] - reference).abs().max()
    # The model is as before after the block.
    assert not any("forward" in vars(m) for m in model.modules())


def test_group_norm_sees_the_padding_without_it():
    model = stock_model(extractor_mode="default").eval()
    assert len(group_norm_feature_extractors(model)) == 1
    assert group_norm_feature_extractors(stock_model(extractor_mode="layer_norm")) == []
    plain = encoder_outputs(model, [LONG, SHORT], blind=False)
    reference = alone(model, SHORT)
    assert (plain[1] - reference).abs().max() > 1e-2
