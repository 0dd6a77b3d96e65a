"""A tiny pretraining run with ``common.tensorboard_logdir`` writes the plugin's metrics
(code usage, pooled perplexities, tightness, KNN loss) as TensorBoard scalars for every
logged update and for validation: read back with TensorBoard's EventAccumulator, each
scalar equals the value fairseq's JSON log printed for the same step and subset."""

import pytest

from fairseq_run import CONFIG_DIR, parse_json_log, records_of, run_hydra_train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

UPDATES = 3
PLUGIN_SCALARS = (
    "knn_loss",
    "code_usage",
    "used_codes",
    "pooled_code_perplexity",
    "pooled_prob_perplexity",
    "tightness_max_prob",
    "tightness_vertex_l2",
)
# fairseq's JSON log rounds to 3 or 4 decimals; the TensorBoard values are unrounded.
JSON_ROUNDING = 6e-4


def scalars(logdir):
    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]
    }


@pytest.mark.slow
def test_tiny_run_writes_the_plugin_metrics_to_tensorboard(tiny_manifests, tmp_path):
    logdir = tmp_path / "tensorboard"
    result = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [
            f"task.data={tiny_manifests}",
            f"optimization.max_update={UPDATES}",
            "common.log_interval=1",
            f"common.tensorboard_logdir={logdir}",
        ],
        tmp_path / "run",
    )
    records = parse_json_log(result.stdout)

    # One folder per fairseq logger: train_inner (every log_interval), train (epoch), valid.
    for logger, prefix in (("train_inner", ""), ("train", "train_"), ("valid", "valid_")):
        written = scalars(logdir / logger)
        assert set(PLUGIN_SCALARS) <= set(written), (logger, sorted(written))
        logged = records_of(records, logger)
        assert logged, logger
        for record in logged:
            step = int(record[prefix + "num_updates"] if prefix + "num_updates" in record else record["num_updates"])
            for name in PLUGIN_SCALARS:
                assert step in written[name], (logger, name, sorted(written[name]))
                assert written[name][step] == pytest.approx(record[prefix + name], abs=JSON_ROUNDING), (
                    logger,
                    name,
                    step,
                )
    assert sorted(scalars(logdir / "train_inner")["knn_loss"]) == list(range(1, UPDATES + 1))
