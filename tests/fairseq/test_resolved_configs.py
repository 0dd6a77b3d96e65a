"""Every runnable pretraining and image config resolves to what it resolved to before the
configs were composed from one recipe file per scale: the snapshot in
data/resolved_configs.json, with the field renames of 0.1.0 -> 0.2.0 applied to it through
the one map below."""

import json
from pathlib import Path
from typing import Any, Dict

import pytest
from omegaconf import OmegaConf

import fairseq  # noqa: F401
import fairseq_knnvq
from fairseq.dataclass.initialize import add_defaults
from hydra.core.global_hydra import GlobalHydra
from test_config_user_dir import compose_like_fairseq_hydra_train, runnable_configs

from fairseq_run import CONFIG_DIR

SNAPSHOT = Path(__file__).parent / "data" / "resolved_configs.json"
# Config fields renamed since the snapshot, in 0.2.0 (old dotted key -> new dotted key).
RENAMED: Dict[str, str] = {
    "model.quantizer_smoothing": "model.smoothing",
    "model.quantizer_regularizer": "model.regularizer",
    "model.codebook_size": "model.latent_vars",
    "model.codebook_groups": "model.latent_groups",
    "model.temperature": "model.latent_temp",
    "criterion.knn_loss_weight": "criterion.knn_weight",
    "criterion.diversity_loss_weight": "criterion.diversity_weight",
    "criterion.vq_loss_weight": "criterion.vq_weight",
}


# Values changed on purpose since the snapshot (variant prefix -> dotted key -> value):
# BASE uses global KNN, from the K-rule study in docs/study.md (issue 19).
CHANGED: Dict[str, Dict[str, Any]] = {
    "pretraining/base_": {"model.knn_global": True},
}


def _flat(cfg: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved(group: str, name: str) -> Dict[str, Any]:
    """What fairseq-hydra-train runs for ``configs/<group>/<name>.yaml`` (with
    ``task.data=/data``): composed, fairseq's defaults added, resolved, as dotted keys."""
    fairseq_knnvq.register_with_fairseq()
    cfg = compose_like_fairseq_hydra_train(CONFIG_DIR / group, name, ["task.data=/data"])
    add_defaults(cfg)
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    GlobalHydra.instance().clear()
    return _flat(OmegaConf.to_container(job, resolve=True, enum_to_str=True))


def _snapshot() -> Dict[str, Dict[str, Any]]:
    data = json.loads(SNAPSHOT.read_text())
    out = {}
    for variant, own in data["variants"].items():
        values = {**data["shared"][variant.split("/")[0]], **own}
        out[variant] = {RENAMED.get(key, key): value for key, value in values.items()}
        for prefix, changed in CHANGED.items():
            if variant.startswith(prefix):
                out[variant].update(changed)
    return out


EXPECTED = _snapshot()


def test_every_runnable_variant_has_a_snapshot():
    runnable = {f"{group}/{name}" for group, name in runnable_configs() if group in ("pretraining", "image")}
    assert runnable == set(EXPECTED) and len(runnable) == 31


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_variant_resolves_to_its_snapshot(variant, monkeypatch):
    monkeypatch.setenv("FAIRSEQ_KNNVQ_USER_DIR", "/plugin")
    assert resolved(*variant.split("/")) == EXPECTED[variant]
