"""``model.latent_temp`` is checked by one function for both models
(``checked_temperature``): a bad value stops the build with a RunConfigError naming the
option and a valid value, for wav2vec2_knnvq and vq_image_autoencoder alike."""

import pytest

import fairseq  # noqa: F401
import fairseq_knnvq
from fairseq.dataclass.utils import merge_with_parent
from omegaconf import OmegaConf

from fairseq_knnvq.models.smoothed_quantizer_config import checked_temperature
from fairseq_knnvq.models.vq_image_autoencoder import VQImageAutoencoder, VQImageAutoencoderConfig
from fairseq_knnvq.preflight import RunConfigError
from fairseq_knnvq.quantization import TemperatureSchedule
from tiny_wav2vec2 import built_knnvq_model as build_speech

fairseq_knnvq.register_with_fairseq()

IMAGE = dict(channels=8, max_channels=16, num_res_blocks=1, code_dim=8, latent_vars=16, downsample_factor=4)
EXAMPLE = "; e.g. model.latent_temp='[2.0,0.5,0.999995]'"
BAD = [
    ([2.0, 0.5, 1.5], "model.latent_temp (start, end, decay) needs start > 0, end > 0 and 0 < decay <= 1, got "),
    ([0.0, 0.5, 0.9], "needs start > 0"),
    ([2.0, 0.5], "model.latent_temp must be (start, end, decay), got "),
]


def build_image(**options):
    cfg = merge_with_parent(VQImageAutoencoderConfig(), OmegaConf.create(dict(IMAGE, **options)))
    return VQImageAutoencoder.build_model(cfg)


@pytest.mark.parametrize("build", [build_image, build_speech], ids=["image", "speech"])
@pytest.mark.parametrize("value, message", BAD)
def test_bad_temperature_is_named_by_both_models(build, value, message):
    with pytest.raises(RunConfigError) as raised:
        build(latent_temp=value)
    assert message in str(raised.value) and str(raised.value).endswith(EXAMPLE)


@pytest.mark.parametrize("value", ["(2, 0.5, zero)", "2.0", None, [2.0, "x", 0.9]])
def test_what_is_not_three_numbers_is_named(value):
    with pytest.raises(RunConfigError, match=r"model\.latent_temp must be \(start, end, decay\)"):
        checked_temperature(value)


def test_the_image_models_bad_temperature_stops_before_the_quantizer():
    """The image model used to leave it to the quantizer (a plain ValueError without the
    option's name); now the same check as wav2vec2_knnvq's, with the value as given."""
    with pytest.raises(RunConfigError, match=r"model\.latent_temp .* got \[2\.0, 0\.5, 1\.5\]; e\.g\."):
        build_image(latent_temp=[2.0, 0.5, 1.5])
    build_image(quantizer="vqvae", latent_temp=[2.0, 0.5, 1.5])  # unused by the VQ-VAE quantizer


def test_good_temperature_gives_the_schedule_to_the_quantizer():
    model = build_image(latent_temp=[1.5, 0.25, 0.9])
    assert model.quantizer.tau_schedule == TemperatureSchedule(1.5, 0.25, 0.9)
    assert checked_temperature("(2, 0.5, 0.999995)") == TemperatureSchedule.parse([2, 0.5, 0.999995])
    assert build_speech(latent_temp=[1.5, 0.25, 0.9]).quantizer.tau_schedule == TemperatureSchedule(1.5, 0.25, 0.9)
