"""End to end: the tiny image configs through stock ``fairseq-hydra-train`` with
``common.user_dir`` on a generated folder of structured images (with one corrupt file),
then ``knnvq-eval-image`` on the checkpoint."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fairseq_knnvq import PLUGIN_DIR
from fairseq_knnvq.preparation.synthetic_images import write_synthetic_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO, "configs", "image")
BIN = os.path.dirname(sys.executable)
MAX_UPDATE, VALIDATE_EVERY = 60, 30
# One thread per process: on a shared 2-core machine several BLAS threads per process
# oversubscribe the cores and slow training down by an order of magnitude.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("image_data"))
    write_synthetic_image_folder(root, {"train": 64, "val": 16}, size=40, seed=1)
    with open(os.path.join(root, "train", "shapes", "corrupt.JPEG"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated, not an image")
    return root


def train(config, data, out, *overrides):
    cmd = [
        os.path.join(BIN, "fairseq-hydra-train"),
        f"task.data={data}",
        f"common.user_dir={PLUGIN_DIR}",
        f"checkpoint.save_dir={out}",
        f"hydra.run.dir={out}/hydra",
        f"optimization.max_update={MAX_UPDATE}",
        f"dataset.validate_interval_updates={VALIDATE_EVERY}",
        f"checkpoint.save_interval_updates={VALIDATE_EVERY}",
        "common.log_interval=10",
        "lr_scheduler.warmup_updates=5",
        *overrides,
        "--config-dir",
        CONFIG_DIR,
        "--config-name",
        config,
    ]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=600)


def json_logs(output, tag):
    pattern = re.compile(r"\[" + tag + r"\]\[INFO\] - (\{.*\})")
    return [json.loads(m.group(1)) for m in pattern.finditer(output)]


def evaluate(checkpoint, images, out_json, *extra):
    cmd = [os.path.join(BIN, "knnvq-eval-image"), checkpoint, images, "-o", out_json, "--no-progress", *extra]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=300)


class PooledColours(torch.nn.Module):
    """Stand-in for inception-2015-12-05.pt (same calling convention)."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


@pytest.mark.parametrize("config", ["tiny_knn_ce", "tiny_ste"])
def test_tiny_config_trains_writes_grids_and_reloads(config, data_root, tmp_path):
    out = str(tmp_path / "run")
    result = train(config, data_root, out)
    assert result.returncode == 0, result.stdout[-4000:]
    log = result.stdout

    inner = json_logs(log, "train_inner")
    valid = json_logs(log, "valid")
    assert len(inner) >= 5 and len(valid) == 2
    first, last = float(inner[0]["reconstruction_loss"]), float(inner[-1]["reconstruction_loss"])
    # Smoothed VQ first learns the mean colours (a plateau near 0.27 on these images,
    # about 0.87 of the first value) and leaves it after about 100 updates; STE earlier.
    assert last < 0.92 * first, (first, last)
    for v in valid:
        mse = float(v["valid_mse"])
        assert float(v["valid_psnr"]) == pytest.approx(10 * math.log10(4 / mse), abs=2e-3)
        assert 0 < float(v["valid_code_usage"]) <= 1
        assert float(v["valid_pooled_code_perplexity"]) >= 1
        assert "valid_pooled_prob_perplexity" in v and "valid_tightness_max_prob" in v
    if config == "tiny_knn_ce":
        assert "knn_loss" in inner[0] and float(inner[0]["temp"]) < 2.0
    else:
        assert "vq_loss" in inner[0]

    # The corrupt file: one warning naming it, however many epochs saw it, and a count.
    bad = os.path.join(data_root, "train", "shapes", "corrupt.JPEG")
    assert log.count(f"skipping unreadable image {bad}") == 1
    epochs = json_logs(log, "train")
    assert sum(float(e.get("train_unreadable_files", 0)) for e in epochs) >= 1

    # One grid per validation, named by the update, originals above reconstructions.
    for update in (VALIDATE_EVERY, MAX_UPDATE):
        grid = os.path.join(out, f"reconstructions_update{update:07d}.png")
        assert os.path.isfile(grid)
        assert np.asarray(Image.open(grid)).shape == (2 * 32 + 3 * 2, 8 * (32 + 2) + 2, 3)

    # The checkpoint reloads: evaluating it on the validation folder reproduces the last
    # validation's pooled MSE (same weights, same centre crops).
    metrics_json = str(tmp_path / "eval.json")
    extra = []
    if config == "tiny_ste":
        scripted = str(tmp_path / "features.pt")
        torch.jit.script(PooledColours()).save(scripted)
        extra = ["--inception-weights", scripted]
    evaluated = evaluate(os.path.join(out, "checkpoint_last.pt"), os.path.join(data_root, "val"), metrics_json, *extra)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    with open(metrics_json) as f:
        metrics = json.load(f)
    assert metrics["num_images"] == 16 and metrics["unreadable_images"] == []
    assert metrics["mse"] == pytest.approx(float(valid[-1]["valid_mse"]), abs=2e-6)
    assert metrics["psnr"] == pytest.approx(float(valid[-1]["valid_psnr"]), abs=2e-3)
    assert metrics["code_usage"] == pytest.approx(float(valid[-1]["valid_code_usage"]), abs=1e-4)
    assert -1 <= metrics["ssim"] <= 1
    if config == "tiny_ste":
        assert metrics["rfid"] >= 0 and metrics["rfid_inception_weights"] == scripted
    else:
        assert "rfid" not in metrics


def test_missing_split_stops_with_a_clear_error(tmp_path):
    empty = tmp_path / "no_images"
    (empty / "train").mkdir(parents=True)
    result = train("tiny_knn_ce", str(empty), str(tmp_path / "run"))
    assert result.returncode != 0
    assert "split 'valid' not found" in result.stdout
    assert str(empty / "val") in result.stdout


def test_two_workers_pool_validation_metrics_over_the_whole_subset(data_root, tmp_path):
    """Two gloo processes (torchrun) with the global KNN: validation splits the 16
    images between the workers, and the logged pooled MSE, usage and perplexity equal a
    single-process evaluation of the same checkpoint on all 16."""
    out = str(tmp_path / "ddp")
    cmd = [
        os.path.join(BIN, "torchrun"),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        "--master_port=29571",
        os.path.join(BIN, "fairseq-hydra-train"),
        f"task.data={data_root}",
        f"common.user_dir={PLUGIN_DIR}",
        f"checkpoint.save_dir={out}",
        f"hydra.run.dir={out}/hydra",
        "optimization.max_update=10",
        "dataset.validate_interval_updates=10",
        "common.log_interval=5",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_rank=${oc.env:RANK}",
        "model.knn_global=true",
        "--config-dir",
        CONFIG_DIR,
        "--config-name",
        "tiny_knn_ce",
    ]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    valid = json_logs(result.stdout, "valid")[-1]
    inner = json_logs(result.stdout, "train_inner")[-1]
    assert float(inner["bsz"]) > 16  # batches of up to 16 per worker, summed over 2
    assert float(inner["temp"]) < 2.0  # an average, not a sum over workers

    metrics_json = str(tmp_path / "eval.json")
    evaluated = evaluate(os.path.join(out, "checkpoint_last.pt"), os.path.join(data_root, "val"), metrics_json)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    with open(metrics_json) as f:
        metrics = json.load(f)
    assert float(valid["valid_bsz"]) == metrics["num_images"] == 16
    assert metrics["mse"] == pytest.approx(float(valid["valid_mse"]), abs=2e-6)
    assert metrics["used_codes"] == int(float(valid["valid_used_codes"]))
    assert metrics["code_perplexity"] == pytest.approx(float(valid["valid_pooled_code_perplexity"]), abs=1e-3)
