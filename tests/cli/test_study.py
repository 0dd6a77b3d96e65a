"""``knnvq-study``: the grid, the runs through stock fairseq-hydra-train, the tables and
plots, skipping finished runs on a rerun, and errors before any work."""

import csv
import json
import statistics

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq_knnvq import study
from fairseq_knnvq.cli import study as study_cli
from fairseq_run import CONFIG_DIR, last_record, parse_json_log

fairseq_knnvq.register_with_fairseq()


def test_values_keep_commas_inside_brackets_and_quotes():
    assert study.split_values("1,4,[2.0,0.5,0.995],'a,b'") == ["1", "4", "[2.0,0.5,0.995]", "'a,b'"]
    assert study.parse_grid(["model.knn_k=1,8", "+model.x=[1,2],[3,4]"]) == [
        ("model.knn_k", ["1", "8"]),
        ("+model.x", ["[1,2]", "[3,4]"]),
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("model.knn_k", "is not KEY=VALUE"),
        ("model.knn_k=", "is not KEY=VALUE"),
        ("model.knn_k=1,1", "repeated"),
        ("model.knn_k=1,,2", "empty"),
    ],
)
def test_bad_grid_specs_are_named(spec, message):
    with pytest.raises(study.StudyError, match=message):
        study.parse_grid([spec])


def test_expand_is_the_product_of_configs_values_and_seeds():
    points = study.expand(["a", "b"], [("x", ["1", "2"]), ("y", ["u"])], [7, 8])
    assert len(points) == 2 * 2 * 1 * 2
    assert points[0] == study.Point("a", (("x", "1"), ("y", "u")), 7)
    assert len(set(p.folder(study.Path("/o")) for p in points)) == len(points)


def test_aggregate_gives_mean_and_sample_sd_over_seeds():
    results = [
        {"config": "c", "grid": {"k": "1"}, "seed": s, "metrics": {"m": v}} for s, v in ((1, 2.0), (2, 4.0), (3, 9.0))
    ]
    (row,) = study.aggregate(results, ["k"], ["m", "absent"])
    assert row["m"]["mean"] == pytest.approx(5.0, abs=1e-12)
    assert row["m"]["sd"] == pytest.approx(statistics.stdev([2.0, 4.0, 9.0]), abs=1e-12)
    assert row["m"]["n"] == 3 and row["absent"]["n"] == 0


def test_errors_stop_before_any_work(tiny_manifests, tmp_path, capsys):
    out = tmp_path / "out"
    base = [
        "--task",
        "speech",
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--data",
        str(tiny_manifests),
        "--out",
        str(out),
        "--seeds",
        "1",
    ]
    assert study_cli.main(base + ["--configs", "tiny_knn_ce,tiny_nosuch"]) == 2
    assert "no config tiny_nosuch" in capsys.readouterr().err
    assert not out.exists()
    assert study_cli.main(base + ["--configs", "tiny_knn_ce", "--grid", "model.knn_k=1", "--set", "model.knn_k=2"]) == 2
    assert "both in --set and in --grid" in capsys.readouterr().err
    assert (
        study_cli.main(base[:-4] + ["--data", str(tmp_path / "missing"), "--out", str(out), "--configs", "tiny_knn_ce"])
        == 2
    )
    assert "--data" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert study_cli.main(base[:-4] + ["--out", str(tmp_path / "full"), "--configs", "tiny_knn_ce"]) == 2
    assert "not empty and was not made by knnvq-study" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    # A key that hydra cannot compose is caught before the first run.
    assert study_cli.main(base + ["--configs", "tiny_knn_ce", "--grid", "model.no_such_field=1,2"]) == 2
    assert "does not compose" in capsys.readouterr().err
    assert not (out / "runs").exists()


@pytest.mark.slow
def test_two_by_two_grid_with_two_seeds_writes_tables_and_plots(tiny_manifests, tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "--task",
        "speech",
        "--config-dir",
        str(CONFIG_DIR / "pretraining"),
        "--configs",
        "tiny_diversity,tiny_knn_ce",
        "--grid",
        "model.knn_k=2,8",
        "--seeds",
        "1,2",
        "--data",
        str(tiny_manifests),
        "--set",
        "optimization.max_update=3",
        "--out",
        str(out),
        "--jobs",
        "2",
    ]
    assert study_cli.main(argv) == 0
    capsys.readouterr()

    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8
    for row in runs:
        folder = out / "runs" / row["config"] / f"knn_k-{row['model.knn_k']}" / f"seed{row['seed']}"
        # The table holds the last validation record fairseq logged for the run.
        valid = last_record(parse_json_log((folder / "console.log").read_text()), "valid")
        for metric in study.DEFAULT_METRICS["speech"]:
            assert float(row[metric]) == pytest.approx(valid["valid_" + metric], rel=1e-6), (folder, metric)
        assert valid["valid_num_updates"] == 3

    # The diversity runs do not use knn_k, and each run is reproducible: equal rows.
    def metrics_of(config, k, seed):
        (row,) = [r for r in runs if (r["config"], r["model.knn_k"], r["seed"]) == (config, k, seed)]
        return {m: row[m] for m in study.DEFAULT_METRICS["speech"]}

    assert metrics_of("tiny_diversity", "2", "1") == metrics_of("tiny_diversity", "8", "1")
    assert metrics_of("tiny_diversity", "2", "1") != metrics_of("tiny_diversity", "2", "2")

    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 4
    for row in summary:
        values = [
            float(r["accuracy"]) for r in runs if (r["config"], r["model.knn_k"]) == (row["config"], row["model.knn_k"])
        ]
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-5)
        assert float(row["accuracy_sd"]) == pytest.approx(statistics.stdev(values), rel=1e-5, abs=1e-9)
    table = (out / "summary.md").read_text()
    assert table.count("\n| tiny_") == 4 and "pooled_code_perplexity | pooled_prob_perplexity" in table
    for metric in ("code_usage", "pooled_code_perplexity", "tightness_max_prob", "accuracy"):
        png = out / "plots" / f"{metric}_vs_model_knn_k.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun trains nothing: every run is finished; the results are kept as they were.
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/result.json")}
    assert study_cli.main(argv) == 0
    assert "8 runs: 8 already finished, 0 to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*/result.json")} == before
    assert json.loads(next(iter(before)).read_text())["metrics"]["num_updates"] == 3
