"""Checks of a ``fairseq-hydra-train`` command line against fairseq's registries, for
``knnvq-train`` (:mod:`fairseq_knnvq.cli.train`) and ``knnvq-study``'s compose check.

The primary YAML's groups (``_name``, also through its ``defaults:``), ``GROUP=NAME``
overrides turned into ``GROUP._name=NAME``, and the schema fairseq would compose
(FairseqConfig with the dataclass of each chosen class), so that an override of a field
the schema lacks is found before hydra makes a run folder; the data splits of an audio
run before fairseq builds the model; and whether an error comes from one of the plugin's
own checks. The fairseq-free parts of the messages are in :mod:`fairseq_knnvq.preflight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .preflight import AUDIO_TASKS, audio_splits_of, check_manifest_splits, unknown_override_keys


# FairseqConfig fields whose value is a registered class chosen by ``_name``.
GROUPS = ("task", "model", "criterion", "optimizer", "lr_scheduler", "scoring", "bpe", "tokenizer")


class LaunchError(Exception):
    """An argument that the user has to fix, found before hydra runs."""


def dataclass_registry(group: str) -> Dict[str, Any]:
    """name -> dataclass of the classes registered for ``group`` (after registration)."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    if group == "task":
        return dict(TASK_DATACLASS_REGISTRY)
    if group == "model":
        registry = dict(MODEL_DATACLASS_REGISTRY)
        for arch, model in ARCH_MODEL_NAME_REGISTRY.items():
            if arch not in registry and model in MODEL_DATACLASS_REGISTRY:
                registry[arch] = MODEL_DATACLASS_REGISTRY[model]
        return registry
    if group in REGISTRIES:
        return {name: dc for name, dc in REGISTRIES[group]["dataclass_registry"].items() if dc is not None}
    return {}


def primary_config_path(config_dir: Optional[str], config_name: Optional[str]) -> Optional[Path]:
    if config_dir is None or config_name is None:
        return None
    name = config_name if config_name.endswith(".yaml") else f"{config_name}.yaml"
    path = Path(config_dir).expanduser() / name
    return path if path.is_file() else None


def read_primary(path: Optional[Path], _seen: Optional[set] = None) -> Tuple[Dict[str, Optional[str]], set]:
    """The ``_name`` of each group in the primary YAML (and in the configs of the same
    folder that its ``defaults:`` list includes by name, in hydra's merge order), and the
    groups its ``defaults:`` list selects (those are hydra's to choose)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if path is None:
        return {}, set()
    seen = set() if _seen is None else _seen
    seen.add(path.resolve())
    raw = OmegaConf.load(path)
    own: Dict[str, Optional[str]] = {}
    for group in GROUPS:
        node = raw.get(group) if isinstance(raw, DictConfig) else None
        if isinstance(node, DictConfig) and "_name" in node:
            own[group] = OmegaConf.to_container(node, resolve=False).get("_name")
        elif isinstance(node, str):
            own[group] = node
    in_defaults: set = set()
    defaults = raw.get("defaults") if isinstance(raw, DictConfig) else None
    entries = OmegaConf.to_container(defaults, resolve=False) if isinstance(defaults, ListConfig) else []
    if "_self_" not in entries:
        entries.append("_self_")  # hydra >= 1.1: the primary config's own values come last
    names: Dict[str, Optional[str]] = {}
    for entry in entries:
        if entry == "_self_":
            names.update(own)
        elif isinstance(entry, str):
            included = path.parent / (entry if entry.endswith(".yaml") else f"{entry}.yaml")
            if included.is_file() and included.resolve() not in seen:
                included_names, included_defaults = read_primary(included, seen)
                names.update(included_names)
                in_defaults |= included_defaults
        elif isinstance(entry, dict):
            in_defaults.update(str(key).replace("override ", "").lstrip("+~").split("@")[0].strip() for key in entry)
    return names, in_defaults


def rewrite_overrides(
    argv: Sequence[str], overrides: Sequence[str], names: Dict[str, Optional[str]], in_defaults: set
) -> Tuple[List[str], Dict[str, Optional[str]]]:
    """``GROUP=NAME`` becomes ``GROUP._name=NAME`` for the groups the primary config does
    not select in its defaults list; ``GROUP._name=NAME`` overrides are noted too. Returns
    the new argv and the name chosen for each group."""
    chosen = dict(names)
    replacements: Dict[str, str] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            continue
        if key in GROUPS and key not in in_defaults:
            registry = dataclass_registry(key)
            if value not in registry:
                known = ", ".join(sorted(registry)) or "none"
                raise LaunchError(f"{override}: no {key} named '{value}' is registered (registered: {known})")
            replacements[override] = f"{key}._name={value}"
            chosen[key] = value
        elif key.endswith("._name") and key[: -len("._name")] in GROUPS:
            chosen[key[: -len("._name")]] = value
    return [replacements.get(arg, arg) for arg in argv], chosen


def build_schema(chosen: Dict[str, Optional[str]]):
    """FairseqConfig as a structured config with the dataclass of each chosen class as the
    schema of its group; returns it, the groups that got one and the dataclass name of
    every section (for messages)."""
    from omegaconf import OmegaConf

    from fairseq.dataclass.configs import FairseqConfig

    schema = OmegaConf.structured(FairseqConfig)
    classes = {name: getattr(f.type, "__name__", str(f.type)) for name, f in FairseqConfig.__dataclass_fields__.items()}
    typed = []
    for group, name in chosen.items():
        dc = dataclass_registry(group).get(name) if isinstance(name, str) else None
        if dc is None:
            continue
        node = OmegaConf.structured(dc)
        node._name = name
        schema[group] = node
        classes[group] = dc.__name__
        typed.append(group)
    return schema, typed, classes


def store_schema(config_name: str, chosen: Dict[str, Optional[str]]) -> List[str]:
    """Stores FairseqConfig as the schema of ``config_name`` (as fairseq-hydra-train does),
    with the dataclass of each chosen class as the schema of its group; returns the
    groups that got one."""
    from hydra.core.config_store import ConfigStore

    from fairseq.dataclass.initialize import hydra_init

    hydra_init(config_name)
    schema, typed, _ = build_schema(chosen)
    ConfigStore.instance().store(name=config_name, node=schema)
    return typed


def key_problems(overrides: Sequence[str], chosen: Dict[str, Optional[str]]) -> List[str]:
    """One message per override of a field that the schema lacks (see
    :func:`fairseq_knnvq.preflight.unknown_override_keys`)."""
    from omegaconf import DictConfig

    schema, _, classes = build_schema(chosen)
    fields = {
        section: (list(node.keys()) if isinstance(node, DictConfig) else None)
        for section, node in ((s, schema.get(s)) for s in schema.keys())
    }
    return unknown_override_keys(overrides, fields, classes)


def override_problems(config_dir: Path, config_name: str, overrides: Sequence[str]) -> List[str]:
    """:func:`key_problems` of ``overrides`` for one config of ``config_dir`` (imports
    fairseq and registers the plugin): knnvq-study's hint when a config does not compose."""
    import fairseq  # noqa: F401

    import fairseq_knnvq

    fairseq_knnvq.register_with_fairseq()
    names, in_defaults = read_primary(primary_config_path(str(config_dir), config_name))
    _, chosen = rewrite_overrides(list(overrides), list(overrides), names, in_defaults)
    return key_problems(overrides, chosen)


def check_override_keys(overrides: Sequence[str], chosen: Dict[str, Optional[str]]) -> None:
    """Raises :class:`LaunchError` for an override (also a ``+`` one) of a field that the
    schema does not have, with the nearest valid names: hydra would refuse it after
    creating nothing but suggest ``+KEY``, and fairseq then fails on ``+KEY`` with a
    ``ConfigKeyError`` after hydra made the run folder."""
    messages = key_problems(overrides, chosen)
    if messages:
        raise LaunchError(
            "; ".join(messages) + ". knnvq-train --config-dir DIR --config-name NAME --cfg job "
            "prints every field of the composed config"
        )


def check_run_data(cfg) -> None:
    """Before fairseq builds the model: for fairseq's audio tasks (and the plugin's), the
    data folder holds the manifest of every split the run reads (train_subset, each
    valid_subset unless validation is disabled). Raises :class:`RunConfigError`."""
    task = cfg.get("task") or {}
    if task.get("_name") not in AUDIO_TASKS or not task.get("data") or task.get("multi_corpus_keys"):
        return
    check_manifest_splits(Path(task["data"]), audio_splits_of(cfg.get("dataset") or {}))


def raised_by_plugin_check(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement in the plugin's own code (a
    check of a config value, e.g. ``model.knn_k must be a positive integer``), not from
    a library it called: the innermost frame of its traceback is a ``raise`` line of a
    file under the plugin folder."""
    import linecache
    import os

    import fairseq_knnvq

    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not filename.startswith(fairseq_knnvq.PLUGIN_DIR + os.sep):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")
