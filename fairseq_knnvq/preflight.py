"""Checks made before a run starts: the mistakes of a first hour, answered in one message
that names the fix, before hydra creates a run folder or fairseq builds a model.

Used by ``knnvq-train`` (:mod:`fairseq_knnvq.cli.train`), ``knnvq-study``
(:mod:`fairseq_knnvq.study`) and the plugin's audio tasks:

- a config name that is not in its folder (the folder's configs are listed, the
  ``<scale>_recipe.yaml`` files that hold shared settings left out);
- an override of a field that the config's dataclass does not have, with the nearest
  valid names (``did you mean model.knn_k?``);
- a split that the data folder does not hold (``dataset.valid_subset=valid`` with only
  ``dev.tsv`` there), naming the splits it holds and the override to use.

:class:`RunConfigError` is what the plugin's own checks inside a fairseq run raise:
``fairseq-hydra-train`` prints only its message (hydra prints a
``CompactHydraException`` without a traceback), ``knnvq-train`` prints it as
``knnvq-train: error: ...``. Nothing here imports fairseq.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Collection, Dict, List, Mapping, Optional, Sequence

from hydra.errors import CompactHydraException

RECIPE_SUFFIX = "_recipe"
# The manifest of an audio split is <task.data>/<split>.tsv (fairseq's audio tasks).
MANIFEST_SUFFIX = ".tsv"
# fairseq's audio tasks and the plugin's: task.data holds a <split>.tsv manifest per split.
AUDIO_TASKS = ("audio_pretraining", "audio_finetuning", "audio_pretraining_knnvq", "audio_finetuning_knnvq")
# The split a message suggests for an option, when exactly one split's name has one of these.
LIKELY_SPLIT_WORDS = {"train_subset": ("train",), "valid_subset": ("valid", "dev")}


class RunConfigError(CompactHydraException, ValueError):
    """A check of the plugin that the user has to fix (a config, an option, a data
    folder). The message names the problem and the fix; it is printed without a
    traceback by ``fairseq-hydra-train`` and ``knnvq-train``."""


class PreflightError(Exception):
    """Found by a command line tool before it starts a run; the message says the fix."""


def nearest(name: str, candidates: Collection[str], n: int = 3) -> List[str]:
    """The ``n`` candidates closest to ``name`` (difflib's ratio of at least 0.6), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


def did_you_mean(name: str, candidates: Collection[str], prefix: str = "") -> str:
    """``" (did you mean model.knn_k?)"``, or ``""`` when nothing is close."""
    close = nearest(name, candidates)
    if not close:
        return ""
    named = [f"{prefix}{c}" for c in close]
    return " (did you mean " + (", ".join(named[:-1]) + " or " if len(named) > 1 else "") + named[-1] + "?)"


# -- config names ------------------------------------------------------------------------


def variant_configs(config_dir: Path) -> List[str]:
    """The config names of a folder, without the ``<scale>_recipe.yaml`` files (shared
    settings that the variants include, not configs to run)."""
    return sorted(p.stem for p in Path(config_dir).glob("*.yaml") if not p.stem.endswith(RECIPE_SUFFIX))


def check_config_name(config_dir: Path, config_name: str, option: str = "--config-name") -> None:
    """Raises :class:`PreflightError` unless ``config_dir/config_name.yaml`` exists,
    listing the folder's configs and the closest names."""
    config_dir = Path(config_dir).expanduser()
    if not config_dir.is_dir():
        raise PreflightError(
            f"--config-dir {config_dir} is not a folder; pass the folder of the configs, "
            "e.g. configs/pretraining, configs/finetuning or configs/image"
        )
    name = config_name[: -len(".yaml")] if config_name.endswith(".yaml") else config_name
    if (config_dir / f"{name}.yaml").is_file():
        return
    found = variant_configs(config_dir)
    raise PreflightError(
        f"{option} {name}: there is no {name}.yaml in {config_dir}{did_you_mean(name, found)}; "
        f"its configs: {', '.join(found) or 'none'}"
    )


# -- override keys -----------------------------------------------------------------------


def override_key(override: str) -> Optional[str]:
    """The dotted key that ``KEY=VALUE`` sets or adds (``+``/``++`` stripped); None for a
    deletion (``~KEY``), a hydra setting (``hydra.*``) or an argument without ``=``."""
    key, sep, _ = override.partition("=")
    key = key.strip()
    if not sep or key.startswith("~"):
        return None
    key = key.lstrip("+")
    if not key or key.split(".")[0] == "hydra" or "@" in key or "/" in key:
        return None
    return key


def unknown_override_keys(
    overrides: Sequence[str], fields: Mapping[str, Optional[Collection[str]]], classes: Mapping[str, str]
) -> List[str]:
    """One message per override whose key the config does not have.

    ``fields`` maps every top-level section (``model``, ``dataset``, ...) to its field
    names, or to None when the section has no fixed fields (it is not checked);
    ``classes`` names the dataclass of a section for the message. Only the first two
    levels are checked: ``model.knn_kk`` is refused, ``model.w2v_args.x`` is not."""
    messages = []
    for override in overrides:
        key = override_key(override)
        if key is None:
            continue
        parts = key.split(".")
        section = parts[0]
        if len(parts) < 2:
            continue  # a config group choice (+run_config=slurm_2) or a group's own _name: hydra's
        if section not in fields:
            messages.append(f"{override}: the config has no section {section!r}{did_you_mean(section, fields)}")
            continue
        names = fields[section]
        if len(parts) < 2 or names is None or parts[1] in names:
            continue
        owner = f" ({classes[section]})" if section in classes else ""
        messages.append(
            f"{override}: {section}{owner} has no field {parts[1]!r}"
            f"{did_you_mean(parts[1], names, prefix=section + '.')}"
        )
    return messages


# -- data splits -------------------------------------------------------------------------


def manifest_splits(data: Path) -> List[str]:
    """The audio splits of a manifest folder: the stems of its ``*.tsv`` files."""
    return sorted(p.stem for p in Path(data).glob(f"*{MANIFEST_SUFFIX}")) if Path(data).is_dir() else []


def missing_manifest_split(data: Path, split: str, option: str) -> Optional[str]:
    """None when ``data/<split>.tsv`` exists; else the message that names the splits
    the folder holds and the override to use. ``option`` is the config key that chose
    the split (``dataset.valid_subset``)."""
    data = Path(data)
    if not data.is_dir():
        return (
            f"task.data {data} is not a folder; point task.data at the folder of the manifests "
            "(knnvq-manifest or knnvq-prepare-librispeech write one)"
        )
    if (data / f"{split}{MANIFEST_SUFFIX}").is_file():
        return None
    found = manifest_splits(data)
    if not found:
        return (
            f"task.data {data} holds no manifest (*.tsv); write them with knnvq-manifest or knnvq-prepare-librispeech"
        )
    likely = [s for s in found if any(word in s for word in LIKELY_SPLIT_WORDS[option.split(".")[-1]])]
    choice = likely[0] if len(likely) == 1 else (found[0] if len(found) == 1 else None)
    fix = (
        f"Add {option}={choice} to the command"
        if choice is not None
        else f"Set {option} to one of them ({option}=NAME)"
    )
    return (
        f"{option}={split}, but task.data {data} has no {split}{MANIFEST_SUFFIX}; its splits: "
        f"{', '.join(found)}. {fix}, or write {split}{MANIFEST_SUFFIX} there"
    )


def check_manifest_splits(data: Path, splits: Mapping[str, Sequence[str]]) -> None:
    """Raises :class:`RunConfigError` for the first split of ``splits`` (option ->
    split names) that ``data`` lacks."""
    for option, names in splits.items():
        for split in names:
            message = missing_manifest_split(Path(data), split, option)
            if message is not None:
                raise RunConfigError(message)


def audio_splits_of(dataset_cfg: Mapping) -> Dict[str, List[str]]:
    """The splits that a training run reads, by the option that names them:
    ``dataset.train_subset`` and, unless validation is disabled, every comma-separated
    name of ``dataset.valid_subset``."""
    splits = {"dataset.train_subset": [str(dataset_cfg.get("train_subset") or "train")]}
    if not dataset_cfg.get("disable_validation", False):
        valid = str(dataset_cfg.get("valid_subset") or "valid")
        splits["dataset.valid_subset"] = [s for s in valid.split(",") if s]
    return splits
