"""A checkpoint saved with the 0.1.0 field names (``quantizer_smoothing``,
``quantizer_regularizer``; the image model's ``codebook_size``, ``codebook_groups``,
``temperature``) loads through fairseq as the same variant, with the same outputs, for
pretraining, fine-tuning and images; fairseq would otherwise drop the unknown keys and
build the default variant."""

from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from omegaconf import OmegaConf

import fairseq  # noqa: F401
import fairseq_knnvq
from fairseq import checkpoint_utils, tasks
from fairseq.dataclass.initialize import add_defaults
from fairseq.models.wav2vec.wav2vec2_asr import Wav2Vec2AsrConfig, Wav2VecEncoder
from hydra.core.global_hydra import GlobalHydra
from test_config_user_dir import compose_like_fairseq_hydra_train

from fairseq_knnvq.tasks.renamed_fields import RENAMED_MODEL_FIELDS, rename_old_model_fields
from fairseq_run import CONFIG_DIR


def _config(group: str, name: str, overrides) -> Dict[str, Any]:
    """configs/<group>/<name>.yaml as fairseq-hydra-train runs it, as a plain dict."""
    fairseq_knnvq.register_with_fairseq()
    cfg = compose_like_fairseq_hydra_train(CONFIG_DIR / group, name, ["task.data=/data", *overrides])
    add_defaults(cfg)
    job = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True, enum_to_str=True
    )
    GlobalHydra.instance().clear()
    return job


def _save_with_old_names(path: Path, config: Dict[str, Any]):
    """Builds the config's model and saves it as 0.1.0 did: the model config under the
    old field names. Returns the model."""
    torch.manual_seed(0)
    task = tasks.setup_task(OmegaConf.create(config["task"]))
    model = task.build_model(OmegaConf.create(config["model"]))
    renames = RENAMED_MODEL_FIELDS[config["model"]["_name"]]
    old_model = {
        next((old for old, new in renames.items() if new == key), key): value for key, value in config["model"].items()
    }
    assert set(renames) <= set(old_model) and not set(renames.values()) & set(old_model)
    state = {
        "cfg": {**config, "model": old_model},
        "model": model.state_dict(),
        "args": None,
        "optimizer_history": [
            {"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {}, "num_updates": 0}
        ],
        "extra_state": {"train_iterator": None},
        "last_optimizer_state": None,
    }
    torch.save(state, path)
    return model


def _outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        return model(inputs)


def test_old_speech_checkpoint_loads_as_its_variant_for_pretraining_and_fine_tuning(tmp_path):
    config = _config("pretraining", "tiny_diversity", ["model.smoothing=softmax"])
    path = tmp_path / "old.pt"
    saved = _save_with_old_names(path, config)

    (loaded,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    assert (str(loaded.cfg.regularizer), str(loaded.cfg.smoothing)) == ("diversity", "softmax")
    assert (loaded.quantizer.regularizer, loaded.quantizer.smoothing) == ("diversity", "softmax")
    audio = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    expected, got = _outputs(saved, audio), _outputs(loaded, audio)
    for key in ("x", "diversity_loss", "prob_perplexity"):
        assert torch.equal(got[key], expected[key]), key

    # Fine-tuning builds the pretrained model through the checkpoint's own task.
    encoder = Wav2VecEncoder(Wav2Vec2AsrConfig(w2v_path=str(path), data="/data", normalize=False), output_size=4)
    assert (str(encoder.w2v_model.cfg.regularizer), str(encoder.w2v_model.cfg.smoothing)) == ("diversity", "softmax")
    weights = encoder.w2v_model.state_dict()
    assert all(torch.equal(tensor, saved.state_dict()[name]) for name, tensor in weights.items())


def test_old_image_checkpoint_loads_as_its_variant(tmp_path):
    config = _config("image", "tiny_gumbel_diversity", ["model.latent_groups=2"])
    path = tmp_path / "old.pt"
    saved = _save_with_old_names(path, config)

    (loaded,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    assert (loaded.cfg.latent_vars, loaded.cfg.latent_groups, list(loaded.cfg.latent_temp)) == (
        64,
        2,
        [2.0, 0.5, 0.995],
    )
    assert loaded.quantizer.regularizer == "diversity"
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected, got = _outputs(saved, images), _outputs(loaded, images)
    for key in ("x", "codes", "diversity_loss"):
        assert torch.equal(got[key], expected[key]), key


def test_an_old_and_a_new_name_that_disagree_are_refused():
    cfg = OmegaConf.create({"_name": "wav2vec2_knnvq", "quantizer_regularizer": "diversity", "regularizer": "knn"})
    with pytest.raises(
        ValueError, match="model.quantizer_regularizer .renamed model.regularizer in 0.2.0. is 'diversity'"
    ):
        rename_old_model_fields(cfg)
    same = OmegaConf.create({"_name": "wav2vec2_knnvq", "quantizer_regularizer": "knn", "regularizer": "knn"})
    rename_old_model_fields(same)
    assert OmegaConf.to_container(same) == {"_name": "wav2vec2_knnvq", "regularizer": "knn"}
