"""Bad quantizer options of wav2vec2_knnvq stop before the model is built, naming the
model.* option and a valid value."""

import pytest

from tiny_wav2vec2 import built_knnvq_model as build


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(knn_k=0),
            "model.knn_k must be a positive integer (K, the smoothed vectors pulled towards each codebook "
            "vertex), got 0; e.g. model.knn_k=8",
        ),
        (dict(knn_k=-3), "model.knn_k must be a positive integer"),
        (dict(latent_vars=0), "model.latent_vars must be an integer of at least 2 (codebook entries per group), got 0"),
        (
            dict(latent_vars=1),
            "model.latent_vars must be an integer of at least 2 (codebook entries per group), got 1; "
            "e.g. model.latent_vars=320",
        ),
        (dict(latent_groups=0), "model.latent_groups must be a positive integer"),
        (
            dict(latent_temp=[2.0, 0.5, 1.5]),
            "model.latent_temp (start, end, decay) needs start > 0, end > 0 and 0 < decay <= 1, got [2.0, 0.5, 1.5]",
        ),
        (dict(latent_temp=[0.0, 0.5, 0.9]), "needs start > 0"),
    ],
)
def test_bad_quantizer_option_is_named(options, message):
    with pytest.raises(ValueError) as raised:
        build(**options)
    assert message in str(raised.value)


def test_good_options_build():
    model = build(knn_k=1, latent_temp=[2.0, 0.5, 0.999995])
    assert model.quantizer.knn.k == 1
