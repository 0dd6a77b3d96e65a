"""Every config in configs/ finds the plugin by itself: composed as fairseq-hydra-train
composes it, without common.user_dir on the command line and without
$FAIRSEQ_KNNVQ_USER_DIR, its common.user_dir is this plugin's folder."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

import fairseq
import fairseq_knnvq
from fairseq.dataclass.initialize import hydra_init
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fairseq_run import CONFIG_DIR, console_script

PLUGIN = Path(fairseq_knnvq.PLUGIN_DIR).resolve()


def runnable_configs():
    """(group, name) of every config meant to run; a ``<scale>_recipe.yaml`` holds the
    shared settings that the variants of its folder list in their defaults."""
    found = []
    for group in ("pretraining", "finetuning", "image"):
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            if not path.stem.endswith("_recipe"):
                found.append((group, path.stem))
    return found


def compose_like_fairseq_hydra_train(config_dir: Path, name: str, overrides):
    """fairseq_cli/hydra_train.py: the FairseqConfig schema stored under the config's
    name, fairseq's own config folder as the primary search path, and --config-dir
    added where hydra's command line adds it (before the schema entry), so that
    ``hydra:runtime.config_sources`` is what a real run sees."""
    from hydra.core.config_search_path import SearchPathQuery as Query

    GlobalHydra.instance().clear()
    hydra_init(name)
    search_path = create_config_search_path(os.path.join(os.path.dirname(fairseq.__file__), "config"))
    search_path.prepend(provider="command-line", path=f"file://{config_dir}", anchor=Query(provider="schema"))
    hydra = Hydra.create_main_hydra2(task_name="hydra_train", config_search_path=search_path)
    cfg = hydra.compose_config(name, list(overrides), run_mode=RunMode.RUN, with_log_configuration=False)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_every_runnable_config_is_checked():
    groups = {group for group, _ in runnable_configs()}
    assert groups == {"pretraining", "finetuning", "image"} and len(runnable_configs()) >= 30


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("group, name", runnable_configs())
def test_config_points_common_user_dir_at_the_plugin(group, name, monkeypatch):
    monkeypatch.delenv("FAIRSEQ_KNNVQ_USER_DIR", raising=False)
    cfg = compose_like_fairseq_hydra_train(CONFIG_DIR / group, name, ["task.data=/data"])
    assert Path(cfg.common.user_dir).resolve() == PLUGIN
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_image_config_finds_the_plugin_through_the_real_command_line(tmp_path):
    """The real fairseq-hydra-train, from an unrelated working folder."""
    env = {k: v for k, v in os.environ.items() if k != "FAIRSEQ_KNNVQ_USER_DIR"}
    result = subprocess.run(
        [
            console_script("fairseq-hydra-train"),
            "--config-dir",
            str(CONFIG_DIR / "image"),
            "--config-name",
            "tiny_knn_ce",
            "task.data=/data",
            "--cfg",
            "job",
            "--resolve",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    assert Path(cfg["common"]["user_dir"]).resolve() == PLUGIN
    assert cfg["task"]["_name"] == "image_autoencoding"
