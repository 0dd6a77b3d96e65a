"""knnvq-infer's errors for inputs that are wrong before any model is loaded. Decoding
real fine-tuned checkpoints (and the errors that need one) is in test_finetuning_e2e.py;
the greedy decoding and error rates are tested in tests/fairseq/test_ctc_scoring.py."""
from pathlib import Path

import pytest

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
from fairseq_knnvq.cli import infer_ctc


def _error_of(argv, capsys=None):
    with pytest.raises(SystemExit) as exit_info:
        infer_ctc.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("knnvq-infer: error: "), message
    return message


def test_missing_checkpoint_is_named(tmp_path: Path):
    missing = tmp_path / "nowhere" / "checkpoint_best.pt"
    message = _error_of([str(missing), "--data", str(tmp_path), "--subset", "dev"])
    assert str(missing) in message and "does not exist" in message


def test_a_file_that_is_no_checkpoint_is_named(tmp_path: Path):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint\n")
    message = _error_of([str(not_a_checkpoint), "--data", str(tmp_path), "--subset", "dev"])
    assert str(not_a_checkpoint) in message and "fairseq checkpoint" in message


@pytest.mark.parametrize("option", ["--max-tokens", "--batch-size"])
def test_batch_limits_must_be_positive(tmp_path: Path, option: str):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"")
    message = _error_of([str(checkpoint), "--subset", "dev", option, "0"])
    assert option in message and "positive" in message
