"""End to end: stock ``fairseq-hydra-train`` pretrains wav2vec 2.0 with the plugin on the
shipped tiny corpus, saves, reloads with fairseq's checkpoint_utils, resumes, and logs
the KNN loss and code usage."""

import math

import pytest
import soundfile
import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq import checkpoint_utils

from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqModel
from fairseq_knnvq.quantization import SmoothedVectorQuantizer
from fairseq_knnvq.verdict import verdict
from fairseq_run import CONFIG_DIR, TINY_CORPUS, last_record, parse_json_log, records_of, run_hydra_train

fairseq_knnvq.register_with_fairseq()

PRETRAINING = CONFIG_DIR / "pretraining"
FIRST_UPDATES = 3
NUM_ENTRIES = 2 * 32  # latent_groups x latent_vars of the tiny configs
USAGE_KEYS = (
    "knn_loss",
    "code_usage",
    "used_codes",
    "pooled_code_perplexity",
    "pooled_prob_perplexity",
    "tightness_max_prob",
    "tightness_vertex_l2",
)


def _check_usage(record, prefix=""):
    for key in USAGE_KEYS:
        value = record[prefix + key]
        assert isinstance(value, float) and math.isfinite(value), (prefix + key, value)
    used = record[prefix + "used_codes"]
    assert 1 <= used <= NUM_ENTRIES
    assert record[prefix + "code_usage"] == pytest.approx(used / NUM_ENTRIES, abs=1e-4)
    assert 1.0 <= record[prefix + "pooled_code_perplexity"] <= used + 1e-3
    assert 0.0 < record[prefix + "tightness_max_prob"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "config_name, regularizer",
    [("tiny_knn_ce", "knn"), ("tiny_diversity", "diversity")],
)
def test_tiny_pretraining_trains_saves_reloads_resumes_and_logs_usage(
    config_name, regularizer, tiny_manifests, tmp_path
):
    run_dir = tmp_path / "run"
    overrides = [f"task.data={tiny_manifests}", "common.log_interval=1"]
    first = run_hydra_train(PRETRAINING, config_name, overrides + [f"optimization.max_update={FIRST_UPDATES}"], run_dir)

    # The JSON log: every update and the validation carry the KNN loss and the usage.
    records = parse_json_log(first.stdout)
    updates = records_of(records, "train_inner")
    assert [r["num_updates"] for r in updates] == [1, 2, 3]
    knn_weight = 0.1  # criterion.knn_weight of the tiny configs
    for record in updates:
        _check_usage(record)
        # Extra losses are [diversity, features_pen, knn]; with log_interval 1 each record
        # is one batch, so each weighted term is weight * term / ln 2 (bits).
        assert {k for k in record if k.startswith("loss_")} == {"loss_0", "loss_1", "loss_2"}
        if regularizer == "knn":
            assert record["loss_2"] == pytest.approx(knn_weight * record["knn_loss"] / math.log(2), abs=2e-3)
        else:
            diversity = (NUM_ENTRIES - record["prob_perplexity"]) / NUM_ENTRIES
            assert record["loss_1"] == pytest.approx(0.1 * diversity / math.log(2), abs=2e-3)
    valid = last_record(records, "valid")
    _check_usage(valid, prefix="valid_")
    assert valid["valid_num_updates"] == FIRST_UPDATES
    # Rows per vertex: the KNN search of each step chose from the masked frames that
    # fairseq counts as ntokens (one worker, local KNN), over K * M = 8 * 32.
    for record, prefix in [(r, "") for r in updates] + [(valid, "valid_")]:
        assert record[prefix + "knn_rows"] == pytest.approx(record[prefix + "ntokens"], abs=1e-3)
        assert record[prefix + "knn_rows_per_vertex"] == pytest.approx(record[prefix + "knn_rows"] / (8 * 32), abs=1e-3)
    # ... below 1 here: a run that trains on the KNN loss warns once, with the numbers.
    warnings = [line for line in first.stdout.splitlines() if "KNN rows per vertex" in line]
    if regularizer == "knn":
        assert len(warnings) == 1
        assert f"chooses from {updates[0]['ntokens']:.0f} rows" in warnings[0]
        assert "model.knn_global=true" in warnings[0]
    else:
        assert warnings == []
    # The validation's verdict in words, in the run's own log.
    verdict_line = next(line for line in first.stdout.splitlines() if "code usage on the validation subset" in line)
    assert verdict_line.endswith(
        f"(update {FIRST_UPDATES}): " + verdict({k[len("valid_") :]: v for k, v in valid.items()})
    )

    # The checkpoint loads back through fairseq as the plugin's model.
    checkpoint = run_dir / "checkpoints" / "checkpoint_last.pt"
    assert checkpoint.is_file()
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    assert state["optimizer_history"][-1]["num_updates"] == FIRST_UPDATES
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    model = models[0]
    assert isinstance(model, Wav2Vec2KnnVqModel)
    assert isinstance(model.quantizer, SmoothedVectorQuantizer)
    assert model.quantizer.regularizer == regularizer == cfg.model.regularizer
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    # ... and quantizes real audio of the corpus.
    audio, rate = soundfile.read(str(next(TINY_CORPUS.glob("test/*/*/*.flac"))), dtype="float32")
    model.eval()
    with torch.no_grad():
        _, targets = model.quantize(torch.from_numpy(audio).unsqueeze(0))
    assert targets.shape[-1] == 2 and 0 <= int(targets.min()) and int(targets.max()) < 32

    # Resume from checkpoint_last.pt for one more update.
    second = run_hydra_train(
        PRETRAINING, config_name, overrides + [f"optimization.max_update={FIRST_UPDATES + 1}"], run_dir
    )
    assert f"@ {FIRST_UPDATES} updates" in second.stdout and "Loaded checkpoint" in second.stdout
    resumed = parse_json_log(second.stdout)
    assert [r["num_updates"] for r in records_of(resumed, "train_inner")] == [FIRST_UPDATES + 1]
    _check_usage(records_of(resumed, "train_inner")[0])
    _check_usage(last_record(resumed, "valid"), prefix="valid_")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    assert state["optimizer_history"][-1]["num_updates"] == FIRST_UPDATES + 1


@pytest.mark.slow
def test_no_rows_warning_with_a_row_per_vertex_or_more(tiny_manifests, tmp_path):
    # K = 2: K * M = 64 neighbours per group, for about 180 masked frames a batch
    result = run_hydra_train(
        PRETRAINING,
        "tiny_knn_ce",
        [
            f"task.data={tiny_manifests}",
            "common.log_interval=1",
            "optimization.max_update=2",
            "model.knn_k=2",
            "checkpoint.no_save=true",
        ],
        tmp_path / "run",
    )
    updates = records_of(parse_json_log(result.stdout), "train_inner")
    assert len(updates) == 2
    for record in updates:
        assert record["knn_rows_per_vertex"] == pytest.approx(record["ntokens"] / (2 * 32), abs=1e-3)
        assert record["knn_rows_per_vertex"] > 1
    assert "KNN rows per vertex" not in result.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_workers_sum_their_logs_without_inflating_averages(tiny_manifests, tmp_path):
    """Two gloo workers started by torchrun: fairseq sums the logging outputs across
    workers (the only sync that works without CUDA), and averaged values such as the
    temperature are those of one worker, not their sum."""
    import subprocess

    from fairseq_run import console_script

    run_dir = tmp_path / "ddp"
    command = [
        console_script("torchrun"),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        console_script("fairseq-hydra-train"),
        "--config-dir",
        str(PRETRAINING),
        "--config-name",
        "tiny_knn_ce",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        f"hydra.run.dir={run_dir}",
        f"task.data={tiny_manifests}",
        "optimization.max_update=2",
        "common.log_interval=1",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_rank=${oc.env:RANK}",
    ]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stdout[-6000:]
    records = parse_json_log(result.stdout)
    updates = records_of(records, "train_inner")
    assert [r["num_updates"] for r in updates] == [1, 2]
    for record in updates:
        _check_usage(record)
        # latent_temp [2.0, 0.5, 0.995]: the forward of update n runs at 2 * 0.995**(n - 1)
        assert record["temp"] == pytest.approx(2.0 * 0.995 ** (record["num_updates"] - 1), abs=1e-3)
    valid = last_record(records, "valid")
    _check_usage(valid, prefix="valid_")
    # fairseq sets the update count at the start of each step: validation after update 2
    # runs at the temperature of update 2's forward
    assert valid["valid_temp"] == pytest.approx(2.0 * 0.995, abs=1e-3)


@pytest.mark.slow
def test_compare_script_writes_the_table_of_final_validation_metrics(tmp_path):
    import os
    import subprocess
    import sys

    from fairseq_run import REPO_ROOT

    out = tmp_path / "compare"
    env = dict(os.environ, OMP_NUM_THREADS="1", BIN=os.path.dirname(sys.executable), PYTHON=sys.executable)
    command = ["bash", str(REPO_ROOT / "examples" / "compare_pretraining.sh"), str(out), "1", "tiny_gumbel"]
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stdout[-6000:]
    rows = (out / "comparison.md").read_text().splitlines()
    assert rows[0].startswith("| variant | updates | code usage | used codes | code perplexity")
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells[0] == "tiny_gumbel" and cells[1] == "1"
    assert all(math.isfinite(float(cell)) for cell in cells[1:])
    assert 0 < float(cells[2]) <= 1 and float(cells[3]) == pytest.approx(
        float(cells[2]) * NUM_ENTRIES, abs=0.04
    )  # usage has 3 decimals

    # A second run into the same folder would resume from its checkpoints: refused.
    again = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60, env=env, cwd=str(tmp_path)
    )
    assert again.returncode == 2 and "exists" in again.stdout
