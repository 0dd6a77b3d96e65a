"""The shipped pretraining and run configs: fairseq's BASE recipe except the quantizer,
valid fields, the BASE model size, and run configs that keep the effective batch of 64
GPUs and compose onto a pretraining config."""

import pytest
from omegaconf import OmegaConf

import fairseq
import fairseq_knnvq
from fairseq.dataclass.utils import merge_with_parent

from fairseq_knnvq.criterions.wav2vec_knnvq import (
    Wav2VecKnnVqCriterionConfig,
)
from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel

from pathlib import Path

from fairseq_run import REPO_ROOT as REPO

PRETRAINING_CONFIGS = REPO / "configs" / "pretraining"
RUN_CONFIGS = REPO / "configs" / "run_config"
STOCK_BASE_YAML = (
    Path(fairseq.__file__).parent / "examples" / "wav2vec" / "config" / "pretraining" / "wav2vec2_base_librispeech.yaml"
)

# --- configs -------------------------------------------------------------------------

QUANTIZER_KEYS = {
    "common.user_dir",
    "criterion._name",
    "criterion.knn_weight",
    "model._name",
    "model.latent_groups",
    "model.smoothing",
    "model.regularizer",
    "model.knn_k",
    "model.knn_distance",
    "model.knn_input",
    "model.knn_global",
}


def _flat(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _files(path):
    """What a config file and the recipe its ``defaults`` list names set (merged in the
    list's order; fairseq's schema and the dataclass defaults are not added)."""
    own = OmegaConf.load(path)
    defaults = own.pop("defaults", ["_self_"])
    return OmegaConf.merge(
        *(own if name == "_self_" else OmegaConf.load(path.parent / f"{name}.yaml") for name in defaults)
    )


def _load(path):
    return _flat(OmegaConf.to_container(_files(path)))


def _variants(scale):
    return sorted(p for p in PRETRAINING_CONFIGS.glob(f"{scale}_*.yaml") if not p.stem.endswith("_recipe"))


BASE_CONFIGS = _variants("base")
TINY_CONFIGS = _variants("tiny")


def test_every_compared_variant_has_a_base_and_a_tiny_config():
    names = {p.stem[len("base_") :] for p in BASE_CONFIGS}
    assert {"knn_ce", "knn_l2", "diversity", "gumbel", "ste"} <= names
    assert any(_load(p).get("model.latent_groups") == 1 for p in BASE_CONFIGS)
    assert {p.stem[len("tiny_") :] for p in TINY_CONFIGS} == names


@pytest.mark.parametrize("path", BASE_CONFIGS, ids=lambda p: p.stem)
def test_base_configs_are_fairseqs_base_recipe_except_the_quantizer(path):
    """Apart from the quantizer, the only difference is the task: the plugin's
    ``audio_pretraining_knnvq``, fairseq's ``audio_pretraining`` with the same config."""
    from fairseq.tasks import TASK_REGISTRY
    from fairseq.tasks.audio_pretraining import AudioPretrainingTask

    stock, ours = _load(STOCK_BASE_YAML), _load(path)
    assert stock["task._name"] == "audio_pretraining" and ours["task._name"] == "audio_pretraining_knnvq"
    assert issubclass(TASK_REGISTRY[ours["task._name"]], AudioPretrainingTask)
    for key, value in stock.items():
        if key not in QUANTIZER_KEYS | {"task._name"}:
            assert ours.get(key) == value, key
    assert set(ours) - set(stock) <= QUANTIZER_KEYS


@pytest.mark.parametrize("path", BASE_CONFIGS + TINY_CONFIGS, ids=lambda p: p.stem)
def test_configs_name_valid_fields(path):
    cfg = _files(path)
    model = merge_with_parent(Wav2Vec2KnnVqConfig(), cfg.model)
    criterion = merge_with_parent(Wav2VecKnnVqCriterionConfig(), cfg.criterion)
    assert model._name == "wav2vec2_knnvq" and criterion._name == "wav2vec_knnvq"
    if path.stem.startswith("tiny_"):
        base = _files(PRETRAINING_CONFIGS / path.name.replace("tiny_", "base_"))
        base_model = merge_with_parent(Wav2Vec2KnnVqConfig(), base.model)
        for key in ("smoothing", "regularizer", "knn_k", "knn_distance", "knn_input", "latent_groups"):
            assert model[key] == base_model[key], key
        # BASE picks neighbours over all workers (its per-GPU batch has fewer masked frames
        # than K * M); the tiny configs run on one CPU worker, where both are the same
        assert base_model["knn_global"] is True and model["knn_global"] is False
        assert cfg.criterion == base.criterion
        assert cfg.common.cpu is True and cfg.model.encoder_layers == 2


def test_base_model_has_the_size_of_wav2vec2_base():
    cfg = _files(PRETRAINING_CONFIGS / "base_knn_ce.yaml").model
    model = Wav2Vec2KnnVqModel.build_model(merge_with_parent(Wav2Vec2KnnVqConfig(), cfg))
    assert sum(p.numel() for p in model.parameters()) == 95_044_608


@pytest.mark.parametrize("name", ["local", "slurm_1", "slurm_2", "slurm_4", "slurm_8"])
def test_run_configs_keep_the_effective_batch_of_64_gpus(name):
    cfg = OmegaConf.load(RUN_CONFIGS / f"{name}.yaml")
    world_size = cfg.distributed_training.distributed_world_size
    assert world_size * cfg.optimization.update_freq[0] == 64
    if name.startswith("slurm"):
        launcher = cfg.hydra.launcher
        assert launcher.nodes * launcher.gpus_per_node == world_size
        assert launcher.tasks_per_node == launcher.gpus_per_node  # one process per GPU
        assert cfg.distributed_training.distributed_port > 0  # fairseq's SLURM init needs it


def _compose(config_name, overrides, cfg_part="job"):
    """The config fairseq-hydra-train would run (``--cfg``), resolved, as a dict."""
    import subprocess

    import yaml

    from fairseq_run import console_script

    result = subprocess.run(
        [
            console_script("fairseq-hydra-train"),
            "--config-dir",
            str(PRETRAINING_CONFIGS),
            "--config-name",
            config_name,
            *overrides,
            "--cfg",
            cfg_part,
            "--resolve",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return yaml.safe_load(result.stdout)


@pytest.mark.slow
def test_run_config_composes_onto_a_base_config_and_user_dir_defaults_to_the_plugin():
    cfg = _compose("base_knn_ce", ["hydra.searchpath=[file://configs]", "+run_config=local", "task.data=/data"])
    assert cfg["distributed_training"]["distributed_world_size"] == 8
    assert cfg["optimization"]["update_freq"] == [8]
    assert cfg["model"]["_name"] == "wav2vec2_knnvq" and cfg["criterion"]["knn_weight"] == 0.1
    assert Path(cfg["common"]["user_dir"]).resolve() == Path(fairseq_knnvq.PLUGIN_DIR).resolve()


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2, 4, 8])
def test_slurm_run_configs_select_the_submitit_launcher(nodes):
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        pytest.skip("hydra-submitit-launcher is not installed (pip install 'fairseq-knnvq[slurm]')")
    cfg = _compose(
        "base_knn_ce", ["hydra.searchpath=[file://configs]", f"+run_config=slurm_{nodes}", "task.data=/data"], "hydra"
    )
    launcher = cfg["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["nodes"] == nodes and launcher["tasks_per_node"] == 8
