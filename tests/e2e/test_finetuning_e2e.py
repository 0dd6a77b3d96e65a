"""End to end on the shipped tiny corpus: knnvq-prepare-librispeech writes the data,
stock ``fairseq-hydra-train`` pretrains ``wav2vec2_knnvq`` (tiny_knn_ce) and fine-tunes
it with CTC (configs/finetuning/tiny.yaml), and ``knnvq-infer`` decodes the validation
split (``valid``, the corpus's dev/). The WER it writes must be the one recomputed here
from its hypothesis and reference files, and the one fairseq's own CTC criterion logged
when it validated the same checkpoint on it.

The runs are far shorter than the tiny config's (the tests check the path, not the
accuracy; docs/finetuning.md has the measured accuracy of full tiny runs).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import editdistance
import pytest
import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq_knnvq.cli import infer_ctc, prepare_librispeech
from fairseq_run import CONFIG_DIR, TINY_CORPUS, console_script, last_record, parse_json_log, run_hydra_train

fairseq_knnvq.register_with_fairseq()

PRETRAIN_UPDATES = 20
# Past the all-blank start of CTC training with margin (at 100 updates some runs still
# emit only blanks), so that the WER comparisons compare real hypotheses.
LETTER_UPDATES = 250
# Word-piece CTC leaves the all-blank start much later than letters (still all blank
# after 300 updates here): the sentencepiece test checks the path and the references.
SPM_UPDATES = 40
SPM_VOCAB = 64
DEV_UTTERANCES = 40  # utterances in the shipped corpus's dev split


def fine_tune(
    run_dir: Path, data: Path, w2v_path: Path, overrides=(), pass_user_dir=True
) -> subprocess.CompletedProcess:
    """``fairseq-hydra-train --config-name tiny`` from ``run_dir`` (not the repository
    root); without ``pass_user_dir`` the config's own ``common.user_dir`` must find the
    plugin."""
    run_dir.mkdir(parents=True)
    command = [
        console_script("fairseq-hydra-train"),
        "--config-dir",
        str(CONFIG_DIR / "finetuning"),
        "--config-name",
        "tiny",
        f"task.data={data}",
        f"model.w2v_path={w2v_path}",
        f"checkpoint.save_dir={run_dir / 'checkpoints'}",
        f"hydra.run.dir={run_dir / 'hydra'}",
        *overrides,
    ]
    if pass_user_dir:
        command.append(f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FAIRSEQ_KNNVQ_USER_DIR", None)
    return subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env, cwd=str(run_dir)
    )


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n... {result.stdout[-5000:]}"
    return result


def decode(checkpoint: Path, data: Path, output_dir: Path, *extra: str) -> dict:
    """The real console script, as a user runs it."""
    command = [
        console_script("knnvq-infer"),
        str(checkpoint),
        "--data",
        str(data),
        "--subset",
        "valid",
        "--output-dir",
        str(output_dir),
        "--cpu",
        "--no-progress",
        *extra,
    ]
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stdout[-5000:]
    return json.loads((output_dir / "wer.valid.json").read_text())


def read_lines(path: Path):
    return path.read_text(encoding="utf-8").splitlines()


def check_decoding_files(summary: dict, output_dir: Path, data: Path, require_hypotheses: bool = True) -> None:
    """hypo/ref files in manifest order, and a summary computed from exactly them."""
    hypotheses = read_lines(output_dir / "hypo.valid.txt")
    references = read_lines(output_dir / "ref.valid.txt")
    assert len(hypotheses) == len(references) == summary["num_utterances"] == DEV_UTTERANCES
    # The references are the transcripts, line for line with the manifest.
    assert references == read_lines(data / "valid.wrd")
    word_errors = sum(editdistance.eval(r.split(), h.split()) for r, h in zip(references, hypotheses))
    num_words = sum(len(r.split()) for r in references)
    char_errors = sum(editdistance.eval(r, " ".join(h.split())) for r, h in zip(references, hypotheses))
    num_chars = sum(len(r) for r in references)
    assert (summary["num_word_errors"], summary["num_words"]) == (word_errors, num_words)
    assert (summary["num_char_errors"], summary["num_chars"]) == (char_errors, num_chars)
    assert summary["wer"] == pytest.approx(100 * word_errors / num_words, abs=1e-4)
    assert summary["cer"] == pytest.approx(100 * char_errors / num_chars, abs=1e-4)
    if require_hypotheses:  # not the all-blank model: the comparisons above compare real hypotheses
        assert sum(len(h.split()) for h in hypotheses) > 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train/valid/test of the shipped corpus with letter and sentencepiece labels."""
    dest = tmp_path_factory.mktemp("librispeech_data")
    prepare_librispeech.main(
        [
            str(TINY_CORPUS),
            "--dest",
            str(dest),
            "--split",
            "train=train",
            "--split",
            "valid=dev",
            "--split",
            "test=test",
            "--units",
            "letter",
            "spm",
            "--spm-vocab",
            str(SPM_VOCAB),
        ]
    )
    return dest


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    # No dataset.valid_subset override: the prepared data's splits are the ones the shipped
    # configs read (the fine-tuning runs below do the same with configs/finetuning/tiny.yaml).
    result = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [f"task.data={data}", f"optimization.max_update={PRETRAIN_UPDATES}"],
        run_dir,
    )
    assert last_record(parse_json_log(result.stdout), "valid")["valid_num_updates"] == PRETRAIN_UPDATES
    checkpoint = run_dir / "checkpoints" / "checkpoint_last.pt"
    assert checkpoint.is_file()
    return checkpoint


@pytest.fixture(scope="module")
def letter_run(data, pretrained, tmp_path_factory):
    """Fine-tuned on letters, started outside the repository without common.user_dir, from
    a copy of the pretrained checkpoint that is deleted afterwards."""
    root = tmp_path_factory.mktemp("letters")
    w2v_copy = root / "pretrained_copy.pt"
    shutil.copy(pretrained, w2v_copy)
    # Validation one utterance at a time: fairseq's padded validation batches change what
    # the group-norm feature encoder sees, knnvq-infer's decoding does not depend on the batch.
    result = checked(
        fine_tune(
            root / "run",
            data,
            w2v_copy,
            [f"optimization.max_update={LETTER_UPDATES}", "dataset.batch_size_valid=1"],
            pass_user_dir=False,
        )
    )
    w2v_copy.unlink()  # the fine-tuned checkpoint must not need it any more
    return root / "run" / "checkpoints" / "checkpoint_best.pt", parse_json_log(result.stdout)


@pytest.mark.slow
def test_letters_pretrain_finetune_decode(letter_run, data, tmp_path):
    checkpoint, records = letter_run
    summary = decode(checkpoint, data, tmp_path / "decode")
    check_decoding_files(summary, tmp_path / "decode", data)
    assert summary["post_process"] == "letter" and summary["labels"] == "ltr"
    # The same checkpoint and subset as fairseq's validation (unpadded, see letter_run):
    # the same WER as its CTC criterion logged (to its 3 decimals).
    fairseq_dev = last_record(records, "valid")
    assert fairseq_dev["valid_num_updates"] == LETTER_UPDATES
    assert summary["wer"] == pytest.approx(fairseq_dev["valid_wer"], abs=1.5e-3)


@pytest.mark.slow
def test_sentencepiece_finetune_decode(data, pretrained, tmp_path):
    result = checked(
        fine_tune(
            tmp_path / "run",
            data,
            pretrained,
            [
                "task.labels=spm",
                "criterion.post_process=sentencepiece",
                f"optimization.max_update={SPM_UPDATES}",
            ],
        )
    )
    summary = decode(tmp_path / "run" / "checkpoints" / "checkpoint_best.pt", data, tmp_path / "decode")
    assert summary["labels"] == "spm" and summary["post_process"] == "sentencepiece"
    # The references are the sentencepiece labels turned back into words: valid.wrd.
    check_decoding_files(summary, tmp_path / "decode", data, require_hypotheses=False)
    assert "\u2581" not in (tmp_path / "decode" / "hypo.valid.txt").read_text(encoding="utf-8")
    assert summary["wer"] == pytest.approx(last_record(parse_json_log(result.stdout), "valid")["valid_wer"], abs=1.5e-3)

    # Resuming a fine-tuning run: its checkpoint holds the task's Dictionary, which torch
    # >= 2.6's weights-only loading refuses unless the plugin allow-lists it.
    resumed = checked(
        fine_tune(
            tmp_path / "resume",
            data,
            pretrained,
            [
                "task.labels=spm",
                "criterion.post_process=sentencepiece",
                f"optimization.max_update={SPM_UPDATES + 1}",
                f"checkpoint.save_dir={tmp_path / 'run' / 'checkpoints'}",
            ],
        )
    )
    assert f"@ {SPM_UPDATES} updates)" in resumed.stdout, resumed.stdout[-3000:]  # "Loaded checkpoint ..."
    state = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == SPM_UPDATES + 1


# --- inputs that are wrong: clear errors naming what to fix --------------------------


def infer_error(argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        infer_ctc.main([*argv, "--cpu", "--no-progress"])
    message = str(exit_info.value.code)
    assert message.startswith("knnvq-infer: error: "), message
    return message


def data_copy(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest)
    return dest


@pytest.mark.slow
def test_pretraining_checkpoint_is_not_decoded(pretrained, data):
    for labels in ([], ["--labels", "ltr"]):
        message = infer_error([str(pretrained), "--data", str(data), "--subset", "valid", *labels])
        assert str(pretrained) in message and "not a CTC fine-tuned model" in message


@pytest.mark.slow
def test_checkpoint_of_an_unregistered_model_names_it(letter_run, data, tmp_path):
    checkpoint, _ = letter_run
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # As if the pretrained model came from a plugin this process has not imported.
    state["cfg"]["model"]["w2v_args"]["model"]["_name"] = "wav2vec2_of_another_plugin"
    foreign = tmp_path / "foreign.pt"
    torch.save(state, foreign)
    message = infer_error([str(foreign), "--data", str(data), "--subset", "valid"])
    assert "'wav2vec2_of_another_plugin'" in message and "--user-dir" in message and str(foreign) in message


@pytest.mark.slow
def test_empty_manifest(letter_run, data, tmp_path):
    checkpoint, _ = letter_run
    copy = data_copy(data, tmp_path / "data")
    (copy / "valid.tsv").write_text(read_lines(data / "valid.tsv")[0] + "\n")
    (copy / "valid.ltr").write_text("")
    message = infer_error(
        [str(checkpoint), "--data", str(copy), "--subset", "valid", "--output-dir", str(tmp_path / "out")]
    )
    assert str(copy / "valid.tsv") in message and "no audio files" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_missing_or_mismatched_labels(letter_run, data, tmp_path):
    checkpoint, _ = letter_run
    copy = data_copy(data, tmp_path / "data")
    (copy / "valid.ltr").unlink()
    message = infer_error([str(checkpoint), "--data", str(copy), "--subset", "valid"])
    assert str(copy / "valid.ltr") in message and "does not exist" in message

    (copy / "valid.ltr").write_text("".join(line + "\n" for line in read_lines(data / "valid.ltr")[:-1]))
    message = infer_error([str(checkpoint), "--data", str(copy), "--subset", "valid"])
    assert f"has {DEV_UTTERANCES - 1} lines" in message and f"lists {DEV_UTTERANCES} audio files" in message

    missing_subset = infer_error([str(checkpoint), "--data", str(copy), "--subset", "dev_other"])
    assert str(copy / "dev_other.tsv") in missing_subset


@pytest.mark.slow
def test_the_dictionary_comes_from_the_checkpoint(letter_run, data, tmp_path):
    """fairseq keeps the task's dictionary in the checkpoint: a data folder with only the
    manifest and the labels decodes the same, and labels of other units are refused."""
    checkpoint, _ = letter_run
    copy = data_copy(data, tmp_path / "data")
    (copy / "dict.ltr.txt").unlink()
    without = decode(checkpoint, copy, tmp_path / "without_dict")
    with_dict = decode(checkpoint, data, tmp_path / "with_dict")
    assert without["wer"] == with_dict["wer"] and without["num_words"] == with_dict["num_words"]
    assert (tmp_path / "without_dict" / "hypo.valid.txt").read_text() == (
        tmp_path / "with_dict" / "hypo.valid.txt"
    ).read_text()

    message = infer_error([str(checkpoint), "--data", str(data), "--subset", "valid", "--labels", "spm"])
    assert str(data / "valid.spm") in message and "labels=ltr" in message and "\u2581" in message


@pytest.mark.slow
def test_checkpoint_without_dictionary_and_a_dictionary_that_does_not_fit(letter_run, data, tmp_path):
    checkpoint, _ = letter_run
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    del state["task_state"]  # as checkpoints that do not carry the task's dictionary
    older = tmp_path / "older.pt"
    torch.save(state, older)
    copy = data_copy(data, tmp_path / "data")
    (copy / "dict.ltr.txt").unlink()
    message = infer_error([str(older), "--data", str(copy), "--subset", "valid"])
    assert str(copy / "dict.ltr.txt") in message and "does not exist" in message

    with open(copy / "dict.ltr.txt", "w", encoding="utf-8") as dictionary:
        dictionary.write((data / "dict.ltr.txt").read_text(encoding="utf-8") + "# 1\n")
    message = infer_error([str(older), "--data", str(copy), "--subset", "valid"])
    assert str(copy / "dict.ltr.txt") in message and "does not fit" in message


@pytest.mark.slow
def test_fine_tuning_with_a_plugin_folder_that_does_not_exist_names_it(data, pretrained, tmp_path):
    """The config's common.user_dir comes from FAIRSEQ_KNNVQ_USER_DIR when it is set."""
    missing = tmp_path / "no_such_plugin" / "fairseq_knnvq"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", FAIRSEQ_KNNVQ_USER_DIR=str(missing))
    result = subprocess.run(
        [
            console_script("fairseq-hydra-train"),
            "--config-dir",
            str(CONFIG_DIR / "finetuning"),
            "--config-name",
            "tiny",
            f"task.data={data}",
            f"model.w2v_path={pretrained}",
            f"hydra.run.dir={run_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env=env,
        cwd=str(run_dir),
    )
    assert result.returncode != 0
    assert f"FileNotFoundError: {missing}" in result.stdout
