"""knnvq-infer names clips shorter than the model's receptive field before decoding."""

from pathlib import Path

import pytest
import torch

import fairseq  # noqa: F401
import fairseq_knnvq
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

from fairseq_knnvq.checkpoints import min_input_samples
from fairseq_knnvq.cli.infer_ctc import InferenceError, ReferenceData, check_clip_lengths

fairseq_knnvq.register_with_fairseq()

TINY_CONV = "[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] + [(64, 2, 2)]"  # configs/pretraining/tiny_*


@pytest.mark.parametrize("layers, expected", [(TINY_CONV, 400), ("[(32, 4, 2), (32, 3, 3)]", 8)])
def test_min_input_samples_is_where_the_convolutions_give_one_frame(layers, expected):
    model = Wav2Vec2Model(
        Wav2Vec2Config(
            conv_feature_layers=layers,
            encoder_layers=1,
            encoder_embed_dim=32,
            encoder_ffn_embed_dim=32,
            encoder_attention_heads=1,
            conv_pos=4,
            conv_pos_groups=1,
        )
    )
    n = min_input_samples(model)
    assert n == expected
    with torch.no_grad():
        assert model.feature_extractor(torch.zeros(1, n)).shape[-1] == 1  # the reference: fairseq's own convs
        with pytest.raises(RuntimeError):
            model.feature_extractor(torch.zeros(1, n - 1))


def test_short_clips_are_named_with_their_lines():
    reference = ReferenceData(Path("/d/dev.tsv"), Path("/d/dev.ltr"), ("A |",) * 4, 1.0, (16000, 399, 400, 12))
    with pytest.raises(InferenceError) as raised:
        check_clip_lengths(reference, 400, 16000)
    assert str(raised.value) == (
        "2 clips of /d/dev.tsv are shorter than the model's receptive field (400 samples, 25 ms at 16000 Hz), "
        "so the model gives them no output frame: line 3 (399 samples), line 5 (12 samples). Leave them out "
        "of the manifest (and the same lines out of dev.ltr), or pad them with silence"
    )
    check_clip_lengths(reference, 12, 16000)  # all long enough: no error
