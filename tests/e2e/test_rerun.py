"""A finished run started again trains nothing and writes nothing; with a higher
optimization.max_update it resumes from checkpoint_last.pt. For the audio tasks
(pretraining here; fine-tuning shares the code) and the image task."""

import hashlib

import pytest

import fairseq  # noqa: F401
import fairseq_knnvq
from fairseq_knnvq.preparation.synthetic_images import write_synthetic_image_folder
from fairseq_run import CONFIG_DIR, parse_json_log, records_of, run_hydra_train

fairseq_knnvq.register_with_fairseq()


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.pt"))}


@pytest.mark.slow
@pytest.mark.parametrize("group, config", [("pretraining", "tiny_knn_ce"), ("image", "tiny_knn_ce")])
def test_finished_run_run_again_trains_nothing_and_resume_continues(group, config, tiny_manifests, tmp_path):
    if group == "image":
        data = tmp_path / "images"
        write_synthetic_image_folder(str(data), {"train": 16, "val": 8}, size=40, seed=1)
        extra = ["lr_scheduler.warmup_updates=1"]
    else:
        data, extra = tiny_manifests, []
    save_dir = tmp_path / "checkpoints"
    overrides = [
        f"task.data={data}",
        "common.log_interval=1",
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.save_interval_updates=2",
        *extra,
    ]
    first = run_hydra_train(
        CONFIG_DIR / group, config, overrides + ["optimization.max_update=2"], run_dir=tmp_path / "hydra1"
    )
    assert [r["num_updates"] for r in records_of(parse_json_log(first.stdout), "train_inner")] == [1, 2]
    saved = digests(save_dir)
    assert {"checkpoint_last.pt", "checkpoint_best.pt"} <= set(saved)

    again = run_hydra_train(
        CONFIG_DIR / group, config, overrides + ["optimization.max_update=2"], run_dir=tmp_path / "hydra2"
    )
    assert "has 2 updates, optimization.max_update is 2: nothing to train" in again.stdout
    assert records_of(parse_json_log(again.stdout), "train_inner") == []
    assert digests(save_dir) == saved  # checkpoint_last.pt and checkpoint_best.pt untouched

    longer = run_hydra_train(
        CONFIG_DIR / group, config, overrides + ["optimization.max_update=3"], run_dir=tmp_path / "hydra3"
    )
    assert "Loaded checkpoint" in longer.stdout
    assert [r["num_updates"] for r in records_of(parse_json_log(longer.stdout), "train_inner")] == [3]
