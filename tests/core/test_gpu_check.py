"""scripts/gpu_check.sh on the CPU: its stages run the GPU tests of half precision, the
image model and two CUDA processes, within caps that leave room; its summary names the
failed stages and tests; without CUDA it stops at once with a clear message."""

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_run import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def stages():
    """``stage NAME CAP COMMAND...`` lines of the script: {name: (cap, argv)}."""
    found = {}
    for line in SCRIPT.read_text().splitlines():
        match = re.match(r"stage (\S+) (\d+) (.+)$", line)
        if match:
            found[match.group(1)] = (int(match.group(2)), shlex.split(match.group(3)))
    return found


def marker_expression(argv):
    return argv[argv.index("-m", 2) + 1] if "-m" in argv[2:] else None


def selected(module, function, params, expression):
    """Whether ``pytest -m expression`` runs ``function`` of ``module`` with the marks
    of ``params`` (the marks of its parametrize values), as pytest evaluates it."""
    names = {m.name for m in getattr(module, "pytestmark", [])}
    names |= {m.name for m in getattr(function, "pytestmark", [])}
    names |= {m.name for p in params for m in getattr(p, "marks", ())}
    return eval(expression, {}, {word: word in names for word in ("cuda", "slow")})  # "cuda and not slow"


def cuda_params(function):
    """The parametrize values of ``function`` that carry the cuda mark."""
    return [
        value
        for mark in getattr(function, "pytestmark", [])
        if mark.name == "parametrize"
        for value in mark.args[1]
        if "cuda" in {m.name for m in getattr(value, "marks", ())}
    ]


@pytest.fixture(scope="module")
def test_modules():
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    try:
        return importlib.import_module("test_cuda"), importlib.import_module("test_precision")
    finally:
        sys.path.remove(str(REPO / "tests" / "e2e"))


def test_pytest_stages_run_every_new_gpu_check(test_modules):
    test_cuda, test_precision = test_modules
    found = stages()
    assert list(found) == [
        "pytest_cuda",
        "pytest_cuda_fairseq",
        "bench_topk_layout",
        "bench_quantizer",
        "bench_step_fp32",
        "bench_step_fp16",
    ]
    fast, slow = (found[name][1] for name in ("pytest_cuda", "pytest_cuda_fairseq"))
    for argv, expression, name in (
        (fast, "cuda and not slow", "pytest_cuda"),
        (slow, "cuda and slow", "pytest_cuda_fairseq"),
    ):
        assert argv[1:3] == ["-m", "pytest"] and marker_expression(argv) == expression
        assert "tests" in argv  # every test module, not a list that could miss a new one
        assert argv[argv.index("--junitxml") + 1] == f"$OUT/{name}.xml"  # read by the summary
    fast_expr, slow_expr = marker_expression(fast), marker_expression(slow)

    # the GPU tests of this issue run in the fast stage
    for name in (
        "test_image_model_in_half_precision_on_the_gpu",
        "test_two_processes_with_cuda_tensors",
        "test_quantizer_fused_training_path_on_the_gpu_equals_the_cpu",
    ):
        assert selected(test_cuda, getattr(test_cuda, name), [], fast_expr), name
    for name in (
        "test_vqvae_code_search_in_every_dtype_is_the_float64_argmin",
        "test_straight_through_codebook_gradient_sums_in_float32",
        "test_half_quantizer_codebook_gradient_is_the_float32_one_rounded",
        "test_half_vqvae_codebook_gradient_is_the_float32_one_rounded",
        "test_knn_loss_and_gradient_under_autocast_equal_float32",
        "test_diversity_loss_and_statistics_under_autocast_equal_float32",
        "test_masked_tightness_sums_beyond_fp16_range_under_fp16_autocast",
        "test_quantizer_after_its_projection_ignores_autocast",
        "test_vqvae_under_autocast_equals_float32",
    ):
        function = getattr(test_precision, name)
        params = cuda_params(function)
        assert params, f"{function.__name__} has no cuda parameter"
        assert selected(test_precision, function, params, fast_expr), function.__name__
        assert not selected(test_precision, function, [], fast_expr), function.__name__  # CPU variant: not there
    # the fairseq runs in the other stage, whose cap holds all of them with a minute to spare
    fairseq_test = test_cuda.test_tiny_fp16_pretraining_through_fairseq_on_the_gpu
    assert selected(test_cuda, fairseq_test, [], slow_expr) and not selected(test_cuda, fairseq_test, [], fast_expr)
    assert found["pytest_cuda_fairseq"][0] >= test_cuda.FAIRSEQ_RUNS * test_cuda.FAIRSEQ_RUN_TIMEOUT_S + 60
    assert "--device" in found["bench_topk_layout"][1] and "cuda" in found["bench_topk_layout"][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_script_stops_with_a_clear_message(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, "PYTHON": sys.executable},
    )
    assert result.returncode == 2
    assert "torch sees no CUDA device" in result.stderr and "nothing run" in result.stderr
    assert not out.exists()


def run_summary(out, capsys):
    """The summary script's main (in this process), its exit status and output."""
    status = load_script("scripts/gpu_check_summary.py").main([str(out), "--total-seconds", "700"])
    return status, capsys.readouterr().out


def test_summary_names_failed_stages_and_tests(tmp_path, capsys):
    """A real pytest run (one pass, one failure, one skip) and a real top-k benchmark on
    the CPU stand in for the GPU stages' output files."""
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "import pytest\n"
        "def test_good():\n    assert 1 + 1 == 2\n"
        "def test_bad():\n    assert 2 + 2 == 5, 'two and two'\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(tests),
            "--junitxml",
            str(out / "pytest_cuda.xml"),
        ],
        capture_output=True,
        timeout=120,
        env=ENV,
        cwd=tmp_path,
    )
    sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark imports its harness
    try:
        bench = load_script("benchmarks/bench_topk_layout.py")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert bench.main(["--quick", "--repeats", "1", "--out", str(out / "topk_layout_cuda.json")]) == 0
    capsys.readouterr()
    (out / "header.txt").write_text("gpu_check.sh started (test)\n")
    (out / "stages.tsv").write_text("pytest_cuda\t360\t1\t12\nbench_topk_layout\t120\t124\t120\n")

    status, stdout = run_summary(out, capsys)
    assert status == 1
    lines = stdout.splitlines()
    assert re.search(
        r"^pytest_cuda +360s +12s  FAILED \(exit 1; log pytest_cuda.log\) - 3 tests: 1 passed, "
        r"1 failed, 0 errors, 1 skipped$",
        stdout,
        re.M,
    )
    assert re.search(r"^bench_topk_layout +120s +120s  TIMED OUT after 120 s$", stdout, re.M)
    assert any("test_sample.py::test_bad (failure): AssertionError: two and two" in line for line in lines)
    assert any(line.strip().startswith("top-8 small (2048 x 2 x 256): blocked") for line in lines)
    assert lines[-2].startswith("RESULT: 2 of 2 stages failed in 700 s: pytest_cuda: FAILED")
    assert (out / "summary.txt").read_text() == "\n".join(lines[:-1]) + "\n"

    (out / "stages.tsv").write_text("bench_topk_layout\t120\t0\t30\n")
    status, stdout = run_summary(out, capsys)
    assert status == 0
    assert "RESULT: all 1 stages passed in 700 s" in stdout
