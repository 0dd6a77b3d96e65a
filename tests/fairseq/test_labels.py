"""Fine-tuning labels are checked against the dictionary before training (the same rule
as knnvq-infer): units the dictionary lacks stop the run, naming file, lines and units."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig

from fairseq_knnvq.cli import prepare_librispeech
from fairseq_knnvq.preparation.labels import describe_unknown_units, find_unknown_units
from fairseq_knnvq.tasks.audio_finetuning_knnvq import AudioFinetuningKnnVqTask, LabelError
from fairseq_run import TINY_CORPUS

fairseq_knnvq.register_with_fairseq()


def test_find_unknown_units_lists_units_and_lines():
    lines = ["H E L L O |", "h e l l o |", "A B |", "C A F É |", "1 2 |"]
    found = find_unknown_units(lines, {"H", "E", "L", "O", "|", "A", "B", "C", "F"})
    assert found.units == ("1", "2", "e", "h", "l", "o", "É")
    assert found.line_numbers == (2, 4, 5) and found.num_lines == 5
    assert find_unknown_units(lines[:1] + lines[2:3], {"H", "E", "L", "O", "|", "A", "B"}) is None
    message = describe_unknown_units("x.ltr", found, "dict.ltr.txt")
    assert message == (
        "x.ltr line 2 (and 2 more of its 5 lines: 4, 5) has units that dict.ltr.txt lacks: '1' '2' 'e' 'h' 'l' 'o' 'É'"
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data = tmp_path_factory.mktemp("prepared")
    prepare_librispeech.main(
        [str(TINY_CORPUS), "--dest", str(data), "--split", "train=train", "--split", "dev=dev", "--no-progress"]
    )
    return data


def task_for(data: Path) -> AudioFinetuningKnnVqTask:
    cfg = OmegaConf.structured(AudioFinetuningConfig(data=str(data), labels="ltr", tpu=False, seed=1))
    return AudioFinetuningKnnVqTask.setup_task(cfg)


def test_prepared_labels_load(prepared):
    task = task_for(prepared)
    task.load_dataset("dev")
    assert len(task.datasets["dev"]) == len((prepared / "dev.ltr").read_text().splitlines())


def test_labels_outside_the_dictionary_stop_before_training(prepared, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dev.tsv", "dict.ltr.txt"):
        (data / name).write_bytes((prepared / name).read_bytes())
    lines = (prepared / "dev.ltr").read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].lower()  # lower case
    lines[6] = "C A F É | 1 |"  # an accent and a digit
    (data / "dev.ltr").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    with pytest.raises(LabelError) as raised:
        task_for(data).load_dataset("dev")
    message = str(raised.value)
    lowered = sorted({unit for unit in lines[2].split() if unit != unit.upper()})
    assert message.startswith(
        f"{data / 'dev.ltr'} line 3 (and 1 more of its {len(lines)} lines: 7) has units that "
        f"{data / 'dict.ltr.txt'} lacks: "
    )
    unknown = sorted(set(lowered) | {"1", "É"})
    shown = " ".join(repr(unit) for unit in unknown[:10]) + (
        f" ... ({len(unknown)} in all)" if len(unknown) > 10 else ""
    )
    assert f"lacks: {shown}. " in message
    assert "fairseq would train them as <unk>" in message and "knnvq-prepare-librispeech" in message

    (data / "dev.ltr").write_bytes("A B |\n".encode("utf-8") * (len(lines) - 1) + "\xe9 |\n".encode("latin-1"))
    with pytest.raises(LabelError, match="dev.ltr is not UTF-8 text"):
        task_for(data).load_dataset("dev")


def test_w2v_path_that_is_not_a_pretraining_checkpoint_is_named(tmp_path):
    """What fairseq's Wav2VecEncoder would fail on with KeyError 544502645, an
    AttributeError about remove_pretraining_modules or torch's weights_only advice."""
    import argparse

    import torch

    from fairseq_knnvq.tasks.pretrained_checkpoint import PretrainedCheckpointError, check_pretrained_checkpoint

    fix = "give model.w2v_path the checkpoint_last.pt or checkpoint_best.pt of a pretraining run (configs/pretraining)"
    missing = tmp_path / "missing.pt"
    text = tmp_path / "notes.pt"
    text.write_text("this is a text file\n" * 10)
    no_cfg = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, no_cfg)
    fine_tuned = tmp_path / "ctc.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec_ctc"}}, "model": {}}, fine_tuned)
    old_fairseq = tmp_path / "old.pt"  # args as an argparse.Namespace: allowed, and a registered model
    torch.save({"args": argparse.Namespace(arch="wav2vec2"), "model": {}}, old_fairseq)
    pretrained = tmp_path / "pretrained.pt"
    torch.save({"cfg": {"model": {"_name": "wav2vec2_knnvq"}}, "model": {}}, pretrained)

    cases = {
        missing: f"model.w2v_path {missing} does not exist; {fix}",
        text: f"model.w2v_path {text} is not a checkpoint: neither a PyTorch zip archive nor a pickle; {fix}",
        no_cfg: f"model.w2v_path {no_cfg} is a PyTorch file but not a fairseq checkpoint",
        fine_tuned: f"model.w2v_path {fine_tuned} holds a 'wav2vec_ctc' model (e.g. an already fine-tuned or an "
        f"image model), not a wav2vec 2.0 pretraining checkpoint; {fix}",
    }
    for path, expected in cases.items():
        with pytest.raises(PretrainedCheckpointError) as raised:
            check_pretrained_checkpoint(str(path))
        assert expected in str(raised.value), (path, str(raised.value))
    check_pretrained_checkpoint(str(pretrained))  # the plugin's pretraining model: accepted
    check_pretrained_checkpoint(str(old_fairseq))  # fairseq's wav2vec2 of an old-style checkpoint: accepted
