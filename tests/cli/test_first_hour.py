"""The mistakes of a newcomer's first hour, each answered before any work with one message
that names the fix (issue 22): a config name that does not exist, a misspelt field, data
whose split names differ from the config's, a model.w2v_path that is not a pretraining
checkpoint; and the help text of the data tools.

The knnvq-train cases fail before hydra runs (a few seconds each: the import of fairseq);
the split and w2v_path cases fail before the first update."""

import os
import subprocess
from pathlib import Path

import pytest

from fairseq_knnvq import preflight
from fairseq_run import CONFIG_DIR, TINY_CORPUS, console_script

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def launch(script: str, args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [console_script(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        env=ENV,
        cwd=str(cwd),
    )


def assert_one_message(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 1, ``message`` in the output, no Python traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert message in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def prepare_tiny_corpus(dest: Path, *splits: str) -> Path:
    from fairseq_knnvq.cli import prepare_librispeech

    argv = [str(TINY_CORPUS), "--dest", str(dest), "--no-progress", "--workers", "1"]
    prepare_librispeech.main(argv + [arg for split in splits for arg in ("--split", split)])
    return dest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny corpus prepared under the corpus's own folder names: train, dev and test
    (no valid.tsv, the split the shipped tiny configs validate on)."""
    return prepare_tiny_corpus(tmp_path_factory.mktemp("prepared"), "train=train", "dev=dev", "test=test")


@pytest.fixture(scope="module")
def prepared_as_documented(tmp_path_factory) -> Path:
    """The tiny corpus as the README prepares it: train, valid (its dev/) and test."""
    return prepare_tiny_corpus(tmp_path_factory.mktemp("documented"), "train=train", "valid=dev", "test=test")


# -- config names and fields ------------------------------------------------------------


def test_a_missing_config_lists_the_folders_configs(tmp_path):
    result = launch(
        "knnvq-train",
        [
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--config-name",
            "tiny_knn_c",
            "task.data=/nowhere",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    variants = sorted(p.stem for p in (CONFIG_DIR / "pretraining").glob("*.yaml") if not p.stem.endswith("_recipe"))
    assert_one_message(
        result,
        f"knnvq-train: error: --config-name tiny_knn_c: there is no tiny_knn_c.yaml in "
        f"{CONFIG_DIR / 'pretraining'} (did you mean tiny_knn_ce",
    )
    assert result.stderr.strip().endswith(f"its configs: {', '.join(variants)}")
    assert "tiny_recipe" not in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override", ["model.knn_kk=4", "+model.knn_kk=4"])
def test_a_misspelt_field_names_the_nearest(override, tmp_path):
    result = launch(
        "knnvq-train",
        [
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--config-name",
            "tiny_knn_ce",
            "task.data=/nowhere",
            override,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert_one_message(
        result,
        f"knnvq-train: error: {override}: model (Wav2Vec2KnnVqConfig) has no field "
        "'knn_kk' (did you mean model.knn_k?)",
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_override_keys_are_checked_against_the_sections_fields():
    fields = {"model": ["knn_k", "knn_distance", "w2v_args"], "dataset": ["max_tokens"], "task": None}
    classes = {"model": "M"}
    messages = preflight.unknown_override_keys(
        [
            "model.knn_k=1",
            "++model.knn_k=2",
            "model.w2v_args.x=1",
            "task.anything=1",
            "~model.knn_k",
            "hydra.run.dir=/x",
            "+run_config=slurm_2",
            "hydra/launcher=submitit_slurm",
            "datset.max_tokens=5",
            "model.knn_distanse=ce",
        ],
        fields,
        classes,
    )
    assert messages == [
        "datset.max_tokens=5: the config has no section 'datset' (did you mean dataset?)",
        "model.knn_distanse=ce: model (M) has no field 'knn_distanse' (did you mean model.knn_distance?)",
    ]


# -- split names ------------------------------------------------------------------------


def test_prepared_data_without_the_configs_split_stops_before_the_model(prepared, tmp_path):
    """knnvq-train: before fairseq builds the model (no model summary in the log)."""
    result = launch(
        "knnvq-train",
        [
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--config-name",
            "tiny_knn_ce",
            f"task.data={prepared}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert_one_message(
        result,
        f"knnvq-train: error: dataset.valid_subset=valid, but task.data {prepared} has no "
        "valid.tsv; its splits: dev, test, train. Add dataset.valid_subset=dev to the "
        "command, or write valid.tsv there",
    )
    assert "Wav2Vec2KnnVqModel(" not in result.stdout + result.stderr


def test_stock_fairseq_hydra_train_gets_the_same_message(prepared, tmp_path):
    import fairseq_knnvq

    result = launch(
        "fairseq-hydra-train",
        [
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--config-name",
            "tiny_knn_ce",
            f"task.data={prepared}",
            f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
            "dataset.valid_subset=dev",
            "dataset.train_subset=training",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert_one_message(
        result,
        f"dataset.train_subset=training, but task.data {prepared} has no training.tsv; "
        "its splits: dev, test, train. Add dataset.train_subset=train to the command",
    )


def test_missing_split_messages():
    assert preflight.missing_manifest_split(Path("/nonexistent/data"), "valid", "dataset.valid_subset").startswith(
        "task.data /nonexistent/data is not a folder"
    )


def test_a_bad_w2v_path_is_one_message(prepared_as_documented, tmp_path):
    prepared = prepared_as_documented
    result = launch(
        "knnvq-train",
        [
            "--config-dir",
            str(CONFIG_DIR / "finetuning"),
            "--config-name",
            "tiny",
            f"task.data={prepared}",
            f"model.w2v_path={prepared / 'train.tsv'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert_one_message(result, f"knnvq-train: error: model.w2v_path {prepared / 'train.tsv'} ")
    assert "checkpoint_last.pt or checkpoint_best.pt of a pretraining run" in result.stderr


# -- help text --------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["infer_ctc", "manifest", "prepare_librispeech"])
def test_help_names_each_default_once(module):
    import importlib

    parser = importlib.import_module(f"fairseq_knnvq.cli.{module}").build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in parser._actions:
        help_text = parser.formatter_class("x")._get_help_string(action) or ""
        assert help_text.count("(default:") <= 1, (action.dest, help_text)
        if action.default not in (None, False, "==SUPPRESS==") and "default" not in (action.help or "").lower():
            assert help_text.endswith("(default: %(default)s)"), action.dest  # argparse fills in the value


# -- knnvq-study --------------------------------------------------------------------------


def study_args(data: Path, out: Path, *extra: str):
    return [
        "--task",
        "speech",
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--configs",
        "tiny_knn_ce",
        "--data",
        str(data),
        "--out",
        str(out),
        "--seeds",
        "1",
        "--jobs",
        "1",
        *extra,
    ]


def test_an_empty_data_folder_stops_a_study_before_any_run(tmp_path, capsys):
    from fairseq_knnvq.cli import study as study_cli

    (tmp_path / "empty").mkdir()
    assert study_cli.main(study_args(tmp_path / "empty", tmp_path / "out")) == 2
    assert f"--data {tmp_path / 'empty'} is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_data_folder_without_the_configs_splits_stops_a_study(prepared, tmp_path, capsys):
    """The compose check reads the splits of the composed config: valid.tsv is missing."""
    from fairseq_knnvq.cli import study as study_cli

    assert study_cli.main(study_args(prepared, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert (
        f"config tiny_knn_ce: dataset.valid_subset=valid, but task.data {prepared} has no valid.tsv; its "
        "splits: dev, test, train. Add dataset.valid_subset=dev"
    ) in err
    assert not (tmp_path / "out" / "runs").exists()


def test_an_image_folder_without_images_stops_a_study(tmp_path):
    """check_data on the composed config (the dict that ``--cfg job`` prints)."""
    import yaml

    from fairseq_knnvq import study

    data = tmp_path / "images"
    (data / "train" / "cat").mkdir(parents=True)
    (data / "train" / "cat" / "notes.txt").write_text("no image here")
    runner = study.Study(
        config_dir=CONFIG_DIR / "image",
        configs=["tiny_knn_ce"],
        grid=[],
        seeds=[1],
        out=tmp_path / "out",
        fixed=[],
        metrics=["psnr"],
    )
    job = {
        "task": {"_name": "image_autoencoding", "data": str(data)},
        "dataset": {"train_subset": "train", "valid_subset": "valid", "disable_validation": False},
    }
    with pytest.raises(study.StudyError) as raised:
        runner.check_data("tiny_knn_ce", yaml.safe_dump(job))
    assert str(raised.value).startswith(
        f"config tiny_knn_ce: split 'train': folder '{data / 'train'}' holds no image file"
    )


def test_a_misspelt_grid_key_names_the_nearest_field(tmp_path):
    """The hint that knnvq-study adds to hydra's message when a config does not compose."""
    from fairseq_knnvq import study

    runner = study.Study(
        config_dir=CONFIG_DIR / "pretraining",
        configs=["tiny_knn_ce"],
        grid=[],
        seeds=[1],
        out=tmp_path / "out",
        fixed=[],
        metrics=["loss"],
    )
    assert runner.nearest_fields("tiny_knn_ce", ["task.data=/d", "model.knn_kk=1", "common.seed=1"]) == (
        "\nmodel.knn_kk=1: model (Wav2Vec2KnnVqConfig) has no field 'knn_kk' (did you mean model.knn_k?)"
    )


def seed_results():
    """Two configs x two seeds of final validation metrics; the diversity seeds disagree."""

    def metrics(used, total, max_p):
        return {
            "code_usage": used / total,
            "used_codes": float(used),
            "tightness_max_prob": max_p,
            "loss": 5.0 + used / 100,
        }

    return [
        {"config": "tiny_diversity", "grid": {}, "seed": 1, "metrics": metrics(64, 64, 0.9)},
        {"config": "tiny_diversity", "grid": {}, "seed": 2, "metrics": metrics(58, 64, 0.9)},
        {"config": "tiny_knn_ce", "grid": {}, "seed": 1, "metrics": metrics(64, 64, 0.95)},
        {"config": "tiny_knn_ce", "grid": {}, "seed": 2, "metrics": metrics(63, 64, 0.96)},
    ]


def test_the_verdict_column_shows_disagreement_between_seeds():
    from fairseq_knnvq import study

    results = seed_results()
    rows = study.aggregate(results, [], ["code_usage", "used_codes", "tightness_max_prob"])
    table = study.markdown_summary(rows, [], ["code_usage", "used_codes", "tightness_max_prob"])
    per_seed = {(r["config"], r["seed"]): study.verdict(r["metrics"]) for r in results}
    assert per_seed[("tiny_diversity", 1)] != per_seed[("tiny_diversity", 2)]  # else the case is not tested
    diversity_line = next(line for line in table.splitlines() if line.startswith("| tiny_diversity"))
    assert diversity_line.endswith(
        f"| {per_seed[('tiny_diversity', 1)]} in 1 of 2 seeds; {per_seed[('tiny_diversity', 2)]} in 1 of 2 seeds |"
    )
    # the mean alone (0.953 of the codes) would read as full use
    assert (
        study.verdict({m: rows[0][m]["mean"] for m in ("code_usage", "used_codes", "tightness_max_prob")})
        == per_seed[("tiny_diversity", 1)]
    )
    knn_line = next(line for line in table.splitlines() if line.startswith("| tiny_knn_ce"))
    assert per_seed[("tiny_knn_ce", 1)] == per_seed[("tiny_knn_ce", 2)]
    assert knn_line.endswith(f"| {per_seed[('tiny_knn_ce', 1)]} |")
    assert "verdict (per seed)" in table.splitlines()[0]


def test_a_study_without_a_grid_plots_one_point_per_config(tmp_path, monkeypatch):
    """Each config's mean and standard deviation over seeds, drawn as one error bar."""
    import statistics

    from fairseq_knnvq import report, study

    drawn = {}
    save = report.save_figure

    def keep(fig, path):
        (ax,) = fig.axes  # one ErrorbarContainer per config: (data line, caps, bar segments)
        drawn[path.name] = [
            [
                (line.get_ydata()[0], bar)
                for line in [container.lines[0]]
                for bar in [container.lines[2][0].get_segments()[0]]
            ]
            for container in ax.containers
        ]
        save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    results = seed_results()
    written = []
    study.write_summaries(results, [], ["code_usage", "loss"], tmp_path, written)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "runs.csv",
        "summary.csv",
        "summary.md",
        "plots/code_usage_by_config.png",
        "plots/loss_by_config.png",
    ]
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    for config_index, config in enumerate(("tiny_diversity", "tiny_knn_ce")):
        values = [r["metrics"]["loss"] for r in results if r["config"] == config]
        ((mean, segment),) = drawn["loss_by_config.png"][config_index]
        assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
        (x0, low), (x1, high) = segment
        assert x0 == x1 == config_index
        assert (high - low) / 2 == pytest.approx(statistics.stdev(values), abs=1e-12)


# -- knnvq-report --------------------------------------------------------------------------


def test_report_curves_plot_psnr_in_db_for_image_runs(tmp_path, monkeypatch):
    from fairseq_knnvq import report

    train = '{"epoch": 1, "update": %s, "loss": "%s", "psnr": "%s", "num_updates": "%s"}'
    valid = '{"epoch": 1, "valid_loss": "%s", "valid_psnr": "%s", "valid_num_updates": "%s"}'
    lines = [
        "[2026-01-01 10:00:00,000][train_inner][INFO] - " + train % ("0.5", "0.31", "14.2", "10"),
        "[2026-01-01 10:00:01,000][valid][INFO] - " + valid % ("0.30", "14.6", "10"),
        "[2026-01-01 10:00:02,000][train_inner][INFO] - " + train % ("1.0", "0.21", "16.1", "20"),
        "[2026-01-01 10:00:03,000][valid][INFO] - " + valid % ("0.20", "16.9", "20"),
    ]
    run = report.parse_log_lines(lines, name="image")
    assert "psnr" in report.metrics_to_plot([run])
    labels = {}
    save = report.save_figure

    def keep(fig, path):
        (ax,) = fig.axes
        labels[path.name] = (ax.get_ylabel(), [list(line.get_ydata()) for line in ax.get_lines()])
        save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    report.write_curves_report([run], tmp_path)
    assert labels["psnr.png"] == ("PSNR (dB)", [[14.2, 16.1], [14.6, 16.9]])


def test_a_bad_model_option_is_one_message(tmp_path):
    """A check of the plugin's model config (a ValueError raised by the plugin's code while
    fairseq builds the model) ends knnvq-train with its message only."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text(str(TINY_CORPUS) + "\n")
    result = launch(
        "knnvq-train",
        [
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--config-name",
            "tiny_knn_ce",
            f"task.data={tmp_path / 'data'}",
            "dataset.disable_validation=true",
            "model.knn_k=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert_one_message(result, "knnvq-train: error: model.knn_k must be a positive integer")


def test_only_the_plugins_own_raise_statements_count_as_its_checks():
    from fairseq_knnvq.launch_checks import raised_by_plugin_check
    from fairseq_knnvq.criterions.wav2vec_knnvq import Wav2vecKnnVqCriterion

    with pytest.raises(ValueError) as plugin_check:
        Wav2vecKnnVqCriterion.extra_loss_weights([1, 2, 3], 0.1)
    assert raised_by_plugin_check(plugin_check.value)
    with pytest.raises(ValueError) as library_error:
        Wav2vecKnnVqCriterion.extra_loss_weights(["x"], 0.1)  # float("x") inside the plugin's code
    assert not raised_by_plugin_check(library_error.value)
