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
from typing import Optional, Sequence

from fairseq_knnvq import quiet_logs
from fairseq_knnvq.launch_checks import (
    LaunchError,
    check_override_keys,
    check_run_data,
    primary_config_path,
    raised_by_plugin_check,
    read_primary,
    rewrite_overrides,
    store_schema,
)
from fairseq_knnvq.preflight import PreflightError, RunConfigError, check_config_name


def parse_hydra_args(argv: Sequence[str]):
    """hydra's own reading of the command line (config dir/name and the overrides)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(list(argv))
    return args


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
