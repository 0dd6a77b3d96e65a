"""knnvq-train: fairseq-hydra-train with the plugin registered before hydra composes.

Against stock fairseq-hydra-train on the same YAML: a plugin field that the YAML does not
list needs ``+`` there and not here; ``model=wav2vec2_knnvq`` is refused there ("No match
in the defaults list") and selects the plugin's model here; hydra's own flags pass
through. The runs are one or two updates (the path is what is checked)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from fairseq_run import CONFIG_DIR, TINY_CORPUS, console_script, last_record, parse_json_log

TINY = CONFIG_DIR / "pretraining" / "tiny_knn_ce.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(script: str, config_dir: Path, config_name: str, overrides, cwd: Path, timeout: float = 300):
    return subprocess.run(
        [console_script(script), "--config-dir", str(config_dir), "--config-name", config_name, *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=str(cwd),
    )


def output(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr (fairseq logs to both)."""
    return result.stdout + result.stderr


def write_config(dest: Path, name: str, edit) -> Path:
    """tiny_knn_ce.yaml and the tiny_recipe.yaml it includes, as one file, changed by
    ``edit(config_dict)``."""
    from omegaconf import OmegaConf

    own = OmegaConf.load(TINY)
    recipes = [
        OmegaConf.load(TINY.parent / f"{included}.yaml") for included in own.pop("defaults") if included != "_self_"
    ]
    config = OmegaConf.to_container(OmegaConf.merge(own, *recipes))
    edit(config)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return dest


def checkpoint_cfg(run_dir: Path):
    state = torch.load(run_dir / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    return state["cfg"]


def short_run(run_dir: Path, manifests: Path, updates: int = 1):
    return [
        f"task.data={manifests}",
        f"optimization.max_update={updates}",
        "dataset.disable_validation=true",
        "common.log_interval=1",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_plugin_field_missing_from_the_yaml_needs_no_plus(tiny_manifests, tmp_path):
    def drop_knn_input(config):
        del config["model"]["knn_input"]
        del config["model"]["knn_k"]

    config_dir = write_config(tmp_path / "configs", "without_knn_input", drop_knn_input)
    overrides = ["model.knn_input=probs", "model.knn_k=4"]

    stock = run(
        "fairseq-hydra-train",
        config_dir,
        "without_knn_input",
        [*overrides, *short_run(tmp_path / "stock", tiny_manifests)],
        tmp_path,
    )
    assert stock.returncode != 0
    assert "Could not override 'model.knn_input'" in output(stock) and "+model.knn_input=probs" in output(stock)

    launched = run(
        "knnvq-train",
        config_dir,
        "without_knn_input",
        [*overrides, *short_run(tmp_path / "launched", tiny_manifests)],
        tmp_path,
    )
    assert launched.returncode == 0, output(launched)[-4000:]
    cfg = checkpoint_cfg(tmp_path / "launched")
    assert (cfg["model"]["knn_input"], cfg["model"]["knn_k"], cfg["model"]["_name"]) == ("probs", 4, "wav2vec2_knnvq")
    # The dataclass defaults of the fields nobody set, and the YAML's own values.
    assert cfg["model"]["knn_global"] is False and cfg["model"]["latent_vars"] == 32
    assert last_record(parse_json_log(output(launched)), "train_inner")["num_updates"] == 1


@pytest.mark.slow
def test_the_shipped_config_with_a_plain_override(tmp_path):
    """The command of the issue: the repository's config and model.knn_k=4, no user_dir."""
    from fairseq_knnvq.cli import prepare_librispeech

    data = tmp_path / "data"
    prepare_librispeech.main(
        [str(TINY_CORPUS), "--dest", str(data), "--split", "train=train", "--split", "valid=dev", "--units", "letter"]
    )
    launched = run(
        "knnvq-train",
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        ["model.knn_k=4", *short_run(tmp_path / "run", data, updates=2)],
        tmp_path,
    )
    assert launched.returncode == 0, output(launched)[-4000:]
    cfg = checkpoint_cfg(tmp_path / "run")
    assert cfg["model"]["knn_k"] == 4
    import fairseq_knnvq

    assert cfg["common"]["user_dir"] == fairseq_knnvq.PLUGIN_DIR
    records = parse_json_log(output(launched))
    assert [r["num_updates"] for r in records if r["_logger"] == "train_inner"] == [1, 2]
    assert "knn_loss" in last_record(records, "train_inner")

    # Fine-tuning that checkpoint with a config written as fairseq's own are (fairseq's
    # audio_finetuning task, no common.user_dir): stock fairseq-hydra-train cannot rebuild
    # the plugin's pretrained model; knnvq-train can.
    def as_fairseq_config(config):
        config["common"].pop("user_dir")
        config["task"]["_name"] = "audio_finetuning"

    finetuning = yaml.safe_load((CONFIG_DIR / "finetuning" / "tiny.yaml").read_text())
    as_fairseq_config(finetuning)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fairseq_style.yaml").write_text(yaml.safe_dump(finetuning))
    overrides = [
        f"task.data={data}",
        f"model.w2v_path={tmp_path / 'run' / 'checkpoints' / 'checkpoint_last.pt'}",
        "optimization.max_update=4",
        "dataset.disable_validation=true",
    ]
    stock = run(
        "fairseq-hydra-train",
        tmp_path / "configs",
        "fairseq_style",
        [*overrides, f"hydra.run.dir={tmp_path / 'ft_stock'}"],
        tmp_path,
    )
    # fairseq fails on the first plugin name it meets in the pretrained checkpoint: the
    # task (audio_pretraining_knnvq, "Could not infer task type") or, for a checkpoint of
    # fairseq's own task, the model (KeyError: "'_name'").
    refused = output(stock)
    assert stock.returncode != 0
    assert (
        "Could not infer task type from {'_name': 'audio_pretraining_knnvq'" in refused
        or "KeyError: \"'_name'\"" in refused
    )
    tuned = run(
        "knnvq-train", tmp_path / "configs", "fairseq_style", [*overrides, f"hydra.run.dir={tmp_path / 'ft'}"], tmp_path
    )
    assert tuned.returncode == 0, output(tuned)[-4000:]
    cfg = checkpoint_cfg(tmp_path / "ft")
    assert cfg["model"]["_name"] == "wav2vec_ctc" and cfg["model"]["w2v_args"]["model"]["_name"] == "wav2vec2_knnvq"


@pytest.mark.slow
def test_group_choice_selects_the_plugin_classes(tiny_manifests, tmp_path):
    """A YAML written for stock wav2vec 2.0 (model wav2vec2, criterion wav2vec) trains the
    plugin's model and criterion by group choice."""
    plugin_model_fields = ("smoothing", "regularizer", "knn_k", "knn_distance", "knn_input", "knn_global")

    def stock(config):
        config["model"]["_name"] = "wav2vec2"
        for key in plugin_model_fields:
            config["model"].pop(key)
        config["criterion"]["_name"] = "wav2vec"
        config["criterion"].pop("knn_weight")

    config_dir = write_config(tmp_path / "configs", "stock_w2v", stock)
    choices = ["model=wav2vec2_knnvq", "criterion=wav2vec_knnvq", "model.knn_k=4", "criterion.knn_weight=0.5"]
    refused = run(
        "fairseq-hydra-train",
        config_dir,
        "stock_w2v",
        [*choices, *short_run(tmp_path / "stock", tiny_manifests)],
        tmp_path,
    )
    assert refused.returncode != 0 and "Could not override 'model'" in output(refused)

    launched = run(
        "knnvq-train", config_dir, "stock_w2v", [*choices, *short_run(tmp_path / "run", tiny_manifests)], tmp_path
    )
    assert launched.returncode == 0, output(launched)[-4000:]
    cfg = checkpoint_cfg(tmp_path / "run")
    assert cfg["model"]["_name"] == "wav2vec2_knnvq" and cfg["criterion"]["_name"] == "wav2vec_knnvq"
    assert cfg["model"]["knn_k"] == 4 and cfg["criterion"]["knn_weight"] == 0.5
    assert cfg["model"]["encoder_embed_dim"] == 64  # the YAML's model settings still apply
    record = last_record(parse_json_log(output(launched)), "train_inner")
    assert "knn_loss" in record and "code_usage" in record


@pytest.mark.slow
def test_hydra_flags_pass_through_and_errors_name_the_key(tiny_manifests, tmp_path):
    shown = run(
        "knnvq-train",
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [
            f"task.data={tiny_manifests}",
            "model=wav2vec2_knnvq",
            "model.knn_k=5",
            "model.mask_dropout=0.25",
            "--cfg",
            "job",
        ],
        tmp_path,
    )
    assert shown.returncode == 0, output(shown)[-3000:]
    job = yaml.safe_load(shown.stdout)  # --cfg job prints the composed config on stdout
    assert job["model"]["knn_k"] == 5 and job["model"]["mask_dropout"] == 0.25
    assert job["model"]["_name"] == "wav2vec2_knnvq"
    assert not (tmp_path / "outputs").exists()  # --cfg job prints and trains nothing

    typo = run(
        "knnvq-train",
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        ["--cfg", "job", f"task.data={tiny_manifests}", "model.knn_kk=5"],
        tmp_path,
    )
    assert typo.returncode != 0 and "knn_kk" in output(typo) and "Wav2Vec2KnnVqConfig" in output(typo)

    unknown = run(
        "knnvq-train",
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [f"task.data={tiny_manifests}", "model=wav2vec2_knnv"],
        tmp_path,
    )
    assert unknown.returncode != 0
    assert "knnvq-train: error: model=wav2vec2_knnv: no model named 'wav2vec2_knnv'" in output(unknown)
    assert "wav2vec2_knnvq" in output(unknown)


PRIMARY_CONFIGS = sorted(
    p for group in ("pretraining", "finetuning", "image") for p in (CONFIG_DIR / group).glob("*.yaml")
)


@pytest.mark.parametrize("path", PRIMARY_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_composes_under_the_typed_schema(path):
    """In process, with hydra's compose API: each shipped config composes against the
    schema knnvq-train stores, its groups carry every field of their dataclass (so any
    of them is overridable without +), and the YAML's own values win over the defaults."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import fairseq  # noqa: F401
    import fairseq_knnvq
    from fairseq_knnvq import launch_checks

    fairseq_knnvq.register_with_fairseq()
    names, in_defaults = launch_checks.read_primary(path)
    overrides = ["task.data=/data"] + (["model.w2v_path=/w2v.pt"] if path.parent.name == "finetuning" else [])
    _, chosen = launch_checks.rewrite_overrides(overrides, overrides, names, in_defaults)
    typed = launch_checks.store_schema(path.stem, chosen)
    assert {"task", "model", "criterion"} <= set(typed)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.1"):  # as fairseq's hydra.main
            cfg = compose(config_name=path.stem, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
        # One process stores one primary schema; a schema left under this name would also
        # be matched when another config includes this one in its defaults list.
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().repo.pop(f"{path.stem}.yaml", None)
    raw = yaml.safe_load(path.read_text())
    for group in typed:
        dataclass = launch_checks.dataclass_registry(group)[chosen[group]]
        assert {field.name for field in dataclass.__dataclass_fields__.values()} <= set(cfg[group].keys()), group
        for key, value in (raw.get(group) or {}).items():  # this file's own values (not its defaults')
            if isinstance(value, str) and "${" in value:
                continue
            if key in ("data", "w2v_path"):  # set on the command line above
                continue
            composed = OmegaConf.to_container(cfg[group], enum_to_str=True)[key]
            if isinstance(value, list):
                composed = list(composed)
            assert composed == value or str(composed) == str(value), (group, key, composed, value)
