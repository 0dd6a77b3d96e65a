"""knnvq-infer on a real fine-tuned group-norm checkpoint (tiny_knn_ce pretrained and
fine-tuned with stock fairseq-hydra-train on the shipped corpus): hypotheses that do not
depend on the batch size, a beam of 1 without LM that is greedy decoding, a lexicon beam
search with an LM from knnvq-ngram-lm, and the errors of the beam-search options.

The runs are a few updates long, fine-tuning at a tiny learning rate: the model's output
is near its random start, frame after frame a different letter, which makes both comparisons sensitive (a tiny change of
the log-probabilities changes the hypotheses). docs/finetuning.md has the WERs of fully
trained runs.
"""

import json
from pathlib import Path

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq_knnvq.cli import infer_ctc, ngram_lm, prepare_librispeech
from fairseq_run import CONFIG_DIR, TINY_CORPUS, run_hydra_train

fairseq_knnvq.register_with_fairseq()
pytest.importorskip("flashlight.lib.text.decoder", reason="the lm extra (flashlight-text) is not installed")

DEV_UTTERANCES = 40
PRETRAIN_UPDATES = 2
FINETUNE_UPDATES = 10  # the tri-stage schedule needs an update in each of its phases
# Small enough to keep the output layer near its random start: the config's 0.01 makes
# the model emit only blanks after 10 updates.
FINETUNE_LR = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("decoding_data")
    prepare_librispeech.main(
        [str(TINY_CORPUS), "--dest", str(dest), "--split", "train=train", "--split", "valid=dev", "--no-progress"]
    )
    return dest


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decoding_runs")
    run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [
            f"task.data={data}",
            f"optimization.max_update={PRETRAIN_UPDATES}",
            f"checkpoint.save_dir={root / 'pretrain'}",
        ],
        root / "pretrain_hydra",
    )
    run_hydra_train(
        CONFIG_DIR / "finetuning",
        "tiny",
        [
            f"task.data={data}",
            f"model.w2v_path={root / 'pretrain' / 'checkpoint_last.pt'}",
            f"optimization.max_update={FINETUNE_UPDATES}",
            f"optimization.lr=[{FINETUNE_LR}]",
            f"checkpoint.save_dir={root / 'finetune'}",
        ],
        root / "finetune_hydra",
    )
    return root / "finetune" / "checkpoint_best.pt"


def decode(checkpoint: Path, data: Path, out: Path, *extra: str, name: str = "valid") -> tuple:
    infer_ctc.main(
        [
            str(checkpoint),
            "--data",
            str(data),
            "--subset",
            "valid",
            "--output-dir",
            str(out),
            "--cpu",
            "--no-progress",
            *extra,
        ]
    )
    summary = json.loads((out / f"wer.{name}.json").read_text())
    return summary, (out / f"hypo.{name}.txt").read_text().splitlines()


def infer_error(argv) -> str:
    with pytest.raises(SystemExit) as raised:
        infer_ctc.main([*argv, "--cpu", "--no-progress"])
    message = str(raised.value.code)
    assert message.startswith("knnvq-infer: error: "), message
    return message


@pytest.mark.slow
def test_hypotheses_do_not_depend_on_the_batch_size(checkpoint, data, tmp_path):
    """The model's first block normalises over time (group norm, the tiny and BASE
    default); batches of 4 and 16 pad most of the 40 dev utterances."""
    hypotheses = {}
    for batch_size in (1, 4, 16):
        summary, hypotheses[batch_size] = decode(
            checkpoint, data, tmp_path / f"b{batch_size}", "--batch-size", str(batch_size)
        )
        assert summary["batch_size"] == batch_size and summary["num_utterances"] == DEV_UTTERANCES
    assert sum(len(h.split()) for h in hypotheses[1]) > DEV_UTTERANCES  # real hypotheses, not all blank
    assert hypotheses[4] == hypotheses[1]
    assert hypotheses[16] == hypotheses[1]


@pytest.mark.slow
def test_beam_of_one_without_lm_is_greedy_decoding(checkpoint, data, tmp_path):
    greedy, greedy_hypotheses = decode(checkpoint, data, tmp_path / "greedy")
    beam, beam_hypotheses = decode(
        checkpoint, data, tmp_path / "beam", "--beam", "1", "--lm-weight", "0", name="valid.beam"
    )
    assert beam_hypotheses == greedy_hypotheses
    assert beam["wer"] == greedy["wer"] and beam["cer"] == greedy["cer"]
    assert greedy["decoding"] == "ctc_greedy" and beam["decoding"] == "ctc_beam_search"
    assert beam["beam_search"] == {
        "lm": None,
        "lexicon": None,
        "lexicon_kind": None,
        "search": "lexicon_free",
        "beam": 1,
        "beam_threshold": 50.0,
        "lm_weight": 0.0,
        "word_score": -1.0,
        "sil_weight": 0.0,
        "unk_weight": "-inf",
        "beam_size_token": None,
    }


@pytest.mark.slow
def test_lexicon_search_with_an_lm_of_the_training_words(checkpoint, data, tmp_path):
    lm = tmp_path / "train.3gram.arpa"
    ngram_lm.main([str(data / "train.wrd"), "--order", "3", "--output", str(lm)])
    summary, hypotheses = decode(
        checkpoint,
        data,
        tmp_path / "lm",
        "--lm",
        str(lm),
        "--lexicon-words",
        str(data / "train.wrd"),
        "--beam",
        "8",
        name="valid.beam",
    )
    vocabulary = set((data / "train.wrd").read_text().split())
    assert all(word in vocabulary for line in hypotheses for word in line.split())
    assert summary["beam_search"]["search"] == "lexicon" and summary["beam_search"]["lm"] == str(lm)
    assert summary["beam_search"]["lm_weight"] == 2.0 and summary["beam_search"]["beam"] == 8
    assert (tmp_path / "lm" / "ref.valid.beam.txt").read_text() == (data / "valid.wrd").read_text()


@pytest.mark.slow
def test_a_lexicon_with_units_the_model_lacks_is_named(checkpoint, data, tmp_path):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("CAT C A T |\ncafé c a f é |\n")
    lm = tmp_path / "lm.arpa"
    ngram_lm.main([str(data / "train.wrd"), "--order", "2", "--output", str(lm)])
    message = infer_error(
        [
            str(checkpoint),
            "--data",
            str(data),
            "--subset",
            "valid",
            "--lm",
            str(lm),
            "--lexicon",
            str(lexicon),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert (
        str(lexicon) in message and "line 2: café -> c a f é" in message and "units the model does not have" in message
    )
    assert not (tmp_path / "out").exists()
