"""Every configs/image file composes the way fairseq-hydra-train composes it (the
FairseqConfig schema stored under the config's name, then the defaults list) and sets
the method and scale its name promises."""

import glob
import os

import pytest
from omegaconf import OmegaConf

import fairseq  # noqa: F401
import fairseq_knnvq
from fairseq.dataclass.initialize import add_defaults
from test_config_user_dir import compose_like_fairseq_hydra_train

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "image"
)
METHODS = {
    "ste": dict(quantizer="vqvae"),
    "gumbel": dict(quantizer="smoothed", smoothing="gumbel", regularizer="none"),
    "gumbel_diversity": dict(quantizer="smoothed", smoothing="gumbel", regularizer="diversity"),
    "knn_l2": dict(quantizer="smoothed", smoothing="gumbel", regularizer="knn", knn_distance="l2"),
    "knn_ce": dict(quantizer="smoothed", smoothing="gumbel", regularizer="knn", knn_distance="ce"),
}
SCALES = {"f16_m1024": (16, 1024), "f8_m16384": (8, 16384)}


def compose_like_fairseq(name):
    fairseq_knnvq.register_with_fairseq()
    cfg = compose_like_fairseq_hydra_train(CONFIG_DIR, name, ["task.data=/data/imagenet"])
    add_defaults(cfg)
    return cfg


def config_names():
    return sorted(
        os.path.basename(p)[:-5]
        for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
        if not p.endswith("_recipe.yaml")
    )


def test_every_method_at_every_scale_has_a_file():
    expected = {f"tiny_{m}" for m in METHODS} | {f"imagenet_{s}_{m}" for s in SCALES for m in METHODS}
    assert set(config_names()) == expected


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", config_names())
def test_config_composes_with_its_method_and_scale(name):
    cfg = compose_like_fairseq(name)
    method = next(m for m in sorted(METHODS, key=len, reverse=True) if name.endswith("_" + m))
    assert cfg.task._name == "image_autoencoding" and cfg.task.data == "/data/imagenet"
    assert cfg.model._name == "vq_image_autoencoder"
    assert cfg.criterion._name == "image_vq_reconstruction"
    for key, value in METHODS[method].items():
        assert str(cfg.model[key]) == value, (name, key)
    # Settings of the shared recipe file survive (it is merged after the schema).
    assert cfg.dataset.batch_size is not None and cfg.dataset.required_batch_size_multiple == 1
    assert cfg.checkpoint.best_checkpoint_metric == "psnr"
    if name.startswith("tiny_"):
        assert cfg.task.image_size == 32 and cfg.model.downsample_factor == 4
        assert cfg.common.cpu and not cfg.common.fp16 and cfg.dataset.num_workers == 0
        assert cfg.distributed_training.distributed_world_size == 1
    else:
        f, m = SCALES[name[len("imagenet_") : -len(method) - 1]]
        assert cfg.task.image_size == 256
        assert (cfg.model.downsample_factor, cfg.model.latent_vars) == (f, m)
        assert cfg.common.fp16 and cfg.distributed_training.distributed_world_size == 8
    # Every interpolation of the job's config resolves (hydra's own sweep section is not run).
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    assert os.path.samefile(cfg.common.user_dir, fairseq_knnvq.PLUGIN_DIR)
