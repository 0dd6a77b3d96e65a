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
    return subprocess.run([console_script(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300, env=ENV, cwd=str(cwd))


def assert_one_message(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 1, ``message`` in the output, no Python traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert message in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The tiny corpus as the README prepares it: train, dev and test (no valid.tsv)."""
    from fairseq_knnvq.cli import prepare_librispeech

    dest = tmp_path_factory.mktemp("prepared")
    prepare_librispeech.main([str(TINY_CORPUS), "--dest", str(dest), "--split", "train=train", "--split", "dev=dev",
                              "--split", "test=test", "--no-progress"])
    return dest


# -- config names and fields ------------------------------------------------------------

def test_a_missing_config_lists_the_folders_configs(tmp_path):
    result = launch("knnvq-train", ["--config-dir", str(CONFIG_DIR / "pretraining"), "--config-name", "tiny_knn_c",
                                    "task.data=/nowhere", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    variants = sorted(p.stem for p in (CONFIG_DIR / "pretraining").glob("*.yaml") if not p.stem.endswith("_recipe"))
    assert_one_message(result, f"knnvq-train: error: --config-name tiny_knn_c: there is no tiny_knn_c.yaml in "
                               f"{CONFIG_DIR / 'pretraining'} (did you mean tiny_knn_ce")
    assert result.stderr.strip().endswith(f"its configs: {', '.join(variants)}")
    assert "tiny_recipe" not in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override", ["model.knn_kk=4", "+model.knn_kk=4"])
def test_a_misspelt_field_names_the_nearest(override, tmp_path):
    result = launch("knnvq-train", ["--config-dir", str(CONFIG_DIR / "pretraining"), "--config-name", "tiny_knn_ce",
                                    "task.data=/nowhere", override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_message(result, f"knnvq-train: error: {override}: model (Wav2Vec2KnnVqConfig) has no field "
                               "'knn_kk' (did you mean model.knn_k?)")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_override_keys_are_checked_against_the_sections_fields():
    fields = {"model": ["knn_k", "knn_distance", "w2v_args"], "dataset": ["max_tokens"], "task": None}
    classes = {"model": "M"}
    messages = preflight.unknown_override_keys(
        ["model.knn_k=1", "++model.knn_k=2", "model.w2v_args.x=1", "task.anything=1", "~model.knn_k",
         "hydra.run.dir=/x", "datset.max_tokens=5", "model.knn_distanse=ce"], fields, classes)
    assert messages == [
        "datset.max_tokens=5: the config has no section 'datset' (did you mean dataset?)",
        "model.knn_distanse=ce: model (M) has no field 'knn_distanse' (did you mean model.knn_distance?)",
    ]


# -- split names ------------------------------------------------------------------------

def test_prepared_data_without_the_configs_split_stops_before_the_model(prepared, tmp_path):
    """knnvq-train: before fairseq builds the model (no model summary in the log)."""
    result = launch("knnvq-train", ["--config-dir", str(CONFIG_DIR / "pretraining"), "--config-name", "tiny_knn_ce",
                                    f"task.data={prepared}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_message(result, f"knnvq-train: error: dataset.valid_subset=valid, but task.data {prepared} has no "
                               "valid.tsv; its splits: dev, test, train. Add dataset.valid_subset=dev to the "
                               "command, or write valid.tsv there")
    assert "Wav2Vec2KnnVqModel(" not in result.stdout + result.stderr


def test_stock_fairseq_hydra_train_gets_the_same_message(prepared, tmp_path):
    import fairseq_knnvq

    result = launch("fairseq-hydra-train", [
        "--config-dir", str(CONFIG_DIR / "pretraining"), "--config-name", "tiny_knn_ce", f"task.data={prepared}",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}", "dataset.valid_subset=dev", "dataset.train_subset=training",
        f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_one_message(result, f"dataset.train_subset=training, but task.data {prepared} has no training.tsv; "
                               "its splits: dev, test, train. Add dataset.train_subset=train to the command")


def test_missing_split_messages():
    assert preflight.missing_manifest_split(Path("/nonexistent/data"), "valid", "dataset.valid_subset").startswith(
        "task.data /nonexistent/data is not a folder")


def test_a_bad_w2v_path_is_one_message(prepared, tmp_path):
    result = launch("knnvq-train", ["--config-dir", str(CONFIG_DIR / "finetuning"), "--config-name", "tiny",
                                    f"task.data={prepared}", f"model.w2v_path={prepared / 'train.tsv'}",
                                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
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
