"""knnvq-eval-image's errors: one line each, and no output file."""

import os

from PIL import Image

from fairseq_knnvq.cli.eval_image import main


def test_command_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "m.json")
    assert main([str(tmp_path / "nope.pt"), str(tmp_path), "-o", out]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert not os.path.exists(out)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert main([str(ckpt), str(tmp_path / "empty"), "-o", out]) == 2
    assert "no image file found" in capsys.readouterr().err
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    assert main([str(ckpt), str(folder), "-o", out]) == 2
    assert "could not load checkpoint" in capsys.readouterr().err
    assert not os.path.exists(out)
