"""``knnvq-train``: ``fairseq-hydra-train`` with this plugin registered before hydra composes.

::

    knnvq-train --config-dir configs/pretraining --config-name tiny_knn_ce \\
        task.data=/data/manifests model.knn_k=4 model.knn_input=probs

``fairseq-hydra-train`` composes its config before it imports a user dir, so plugin
classes are unknown to hydra while it composes: ``model=wav2vec2_knnvq`` fails ("No match
in the defaults list") and fields of a plugin dataclass that the YAML does not list need
a leading ``+``. This launcher imports fairseq and the plugin first, then runs fairseq's
own ``hydra_main`` with every command-line argument passed through (``-m``, ``--cfg``,
``hydra.*``, overrides), with three additions:

- ``GROUP=NAME`` (``model=wav2vec2_knnvq``, ``criterion=wav2vec_knnvq``, ``task=...``;
  any name registered in fairseq's registries, the plugin's included) selects that
  class for the group. The primary YAML's settings of the group still apply on top
  of the class's defaults (it becomes ``GROUP._name=NAME``). Groups that the primary
  config lists in its own ``defaults:`` are left to hydra.
- The primary YAML is validated against the dataclasses of the classes it names
  (``_name``, also in the configs of its folder that its ``defaults:`` list includes)
  or that were chosen, as fairseq already does for the top level: every
  field is then overridable without ``+`` (``model.knn_input=probs``), and a key the
  class does not have is an error naming it.
- ``common.user_dir`` is set to this installed plugin unless given, so the plugin is
  the one imported here (fairseq refuses a second ``fairseq_knnvq`` from another path).
- Before hydra runs (so before it makes a run folder): a ``--config-name`` missing from
  ``--config-dir`` is an error listing that folder's configs, and an override (``+``
  too) of a field the schema lacks names the nearest fields ("did you mean
  model.knn_k?"). Before fairseq builds the model, an audio run's ``task.data`` must
  hold every split it reads (:mod:`fairseq_knnvq.preflight`). These errors, and the
  plugin's own checks inside the run (:class:`~fairseq_knnvq.preflight.RunConfigError`),
  end the process with one ``knnvq-train: error: ...`` line and status 1.
- Known-harmless warnings of hydra, torch and fairseq are silenced
  (:mod:`fairseq_knnvq.quiet_logs`).

``fairseq-hydra-train ... common.user_dir=$(python -m fairseq_knnvq)`` keeps working
unchanged; this is a convenience, not a fork.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fairseq_knnvq import quiet_logs
from fairseq_knnvq.preflight import (
    AUDIO_TASKS,
    PreflightError,
    RunConfigError,
    audio_splits_of,
    check_config_name,
    check_manifest_splits,
    unknown_override_keys,
)

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


def parse_hydra_args(argv: Sequence[str]):
    """hydra's own reading of the command line (config dir/name and the overrides)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    return args


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


def checked_pre_main(cfg, **kwargs):
    """fairseq's ``fairseq_cli.train.main`` after :func:`check_run_data`; an error of the
    plugin's own checks (:class:`RunConfigError`, raised here or inside the run) ends
    the process with its message and no traceback. Module level, so that fairseq's
    multi-process spawn can pickle it."""
    from fairseq_cli.train import main as fairseq_main

    try:
        check_run_data(cfg)
        return fairseq_main(cfg, **kwargs)
    except RunConfigError as error:
        raise SystemExit(f"knnvq-train: error: {error}") from None
    except ValueError as error:
        if not raised_by_plugin_check(error):
            raise
        raise SystemExit(f"knnvq-train: error: {error}") from None


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_logs.silence_harmless_warnings()
    quiet_logs.quiet_fairseq_import()
    import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)

    quiet_logs.restore_root_log_level()
    import fairseq_knnvq

    fairseq_knnvq.register_with_fairseq()
    try:
        args = parse_hydra_args(argv)
        config_name = args.config_name or "config"
        if args.config_dir is not None and args.config_name is not None:
            check_config_name(Path(args.config_dir), args.config_name)
        names, in_defaults = read_primary(primary_config_path(args.config_dir, args.config_name))
        # argparse takes hydra's positional overrides from one contiguous run of
        # arguments only: an added override goes next to the user's.
        insert_at = argv.index(args.overrides[0]) if args.overrides else len(argv)
        argv, chosen = rewrite_overrides(argv, args.overrides, names, in_defaults)
        check_override_keys(parse_hydra_args(argv).overrides, chosen)
    except (LaunchError, PreflightError) as error:
        raise SystemExit(f"knnvq-train: error: {error}") from None
    if not any(override.split("=", 1)[0].lstrip("+") == "common.user_dir" for override in args.overrides):
        argv.insert(insert_at, f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}")
    store_schema(config_name, chosen)

    import fairseq_cli.hydra_train
    from fairseq_cli.hydra_train import hydra_main

    fairseq_cli.hydra_train.pre_main = checked_pre_main
    sys.argv = [sys.argv[0] if sys.argv else "knnvq-train", *argv]
    hydra_main()


if __name__ == "__main__":
    main()
