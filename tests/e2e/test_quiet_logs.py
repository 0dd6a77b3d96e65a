"""A tiny pretraining run's console: fairseq's progress and the plugin's metrics, no
warning from the plugin's own code and none of the known-harmless library warnings that
fairseq_knnvq/quiet_logs.py silences (issue 22). The filters are exact: another warning
of the same category still shows."""

import os
import re
import subprocess
import warnings

import pytest
import torch

from fairseq_knnvq import quiet_logs
from fairseq_run import CONFIG_DIR, console_script, last_record, parse_json_log

import fairseq_knnvq

# "<path>/fairseq_knnvq/criterions/wav2vec_knnvq.py:163: UserWarning: ..."
PLUGIN_WARNING = re.compile(re.escape(fairseq_knnvq.PLUGIN_DIR) + r"/\S+\.py:\d+: \w*Warning")


@pytest.mark.slow
def test_a_tiny_run_prints_no_plugin_warning_and_no_harmless_noise(tiny_manifests, tmp_path):
    result = subprocess.run(
        [
            console_script("knnvq-train"),
            "--config-dir",
            str(CONFIG_DIR / "pretraining"),
            "--config-name",
            "tiny_knn_ce",
            f"task.data={tiny_manifests}",
            "optimization.max_update=2",
            "common.log_interval=1",
            "dataset.validate_interval_updates=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=str(tmp_path),
    )
    console = result.stdout
    assert result.returncode == 0, console[-4000:]
    records = parse_json_log(console)
    # what the console is for: fairseq's progress and the plugin's metrics, train and valid
    assert [r["num_updates"] for r in records if r["_logger"] == "train_inner"] == [1, 2]
    assert {"valid_knn_loss", "valid_code_usage"} <= set(last_record(records, "valid"))
    assert not PLUGIN_WARNING.search(console), PLUGIN_WARNING.search(console).group(0)
    for _category, message, _why in quiet_logs.HARMLESS_WARNINGS:
        assert not re.search(message, console), message
    assert "Please install tensorboardX" not in console
    assert not re.search(r"^DEBUG:", console, re.MULTILINE)


def test_the_filters_leave_other_warnings_alone():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_logs.silence_harmless_warnings()
        warnings.warn("`torch.nn.utils.weight_norm` is deprecated in favor of ...", FutureWarning)
        warnings.warn("Using a non-tuple sequence for multidimensional indexing is deprecated", UserWarning)
        warnings.warn(
            "Converting a tensor with requires_grad=True to a scalar may lead to unexpected behavior.", UserWarning
        )
        warnings.warn("`torch.nn.utils.weight_norm` is deprecated", UserWarning)  # another category
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "Converting a tensor with requires_grad=True to a scalar may lead to unexpected behavior."),
        (UserWarning, "`torch.nn.utils.weight_norm` is deprecated"),
    ]


def test_the_silenced_crop_indexing_still_crops_as_a_tuple():
    """fairseq's RawAudioDataset.crop_to_max_size indexes with [slice(start, end)]: the
    installed torch must read it as the tuple it was meant to be, or the filter hides a
    wrong crop (then remove it from quiet_logs)."""
    audio = torch.arange(2 * 50, dtype=torch.float32).view(2, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(audio[[slice(None), slice(7, 19)]], audio[:, 7:19])
        assert torch.equal(audio[0][[slice(3, 11)]], audio[0, 3:11])
