"""The GPU check: the quantizer, the KNN losses and a tiny fp16 pretraining on CUDA.

Every test here is marked ``cuda`` and skipped when torch sees no CUDA device, so the
CPU suite passes by skipping them. On a GPU: ``pytest -m cuda`` (or
``scripts/gpu_check.sh``, which also runs the benchmarks on the GPU).

- the quantizer against fairseq's ``GumbelVectorQuantizer`` on the GPU, same weights
  and the same CUDA random stream: outputs, perplexities and gradients;
- the KNN losses on the GPU (local, masked, chunked; fused softmax + loss) against the
  brute-force definition in float64 on the CPU: values and gradients;
- the quantizer's fused training path on the GPU against the same module on the CPU,
  in float32 and under fp16 autocast;
- 20 updates of the tiny pretraining through ``fairseq-hydra-train`` with
  ``common.fp16=true`` on the GPU: the KNN term enters fairseq's fp16 loss with its
  weight, the loss scaler is active, the run ends at update 20.
"""
import math

import pytest
import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq.modules import GumbelVectorQuantizer

from fairseq_knnvq.quantization import KnnVertexLoss, SmoothedVectorQuantizer, knn_vertex_loss
from fairseq_run import CONFIG_DIR, last_record, parse_json_log, records_of, run_hydra_train
from references import brute_force_knn

fairseq_knnvq.register_with_fairseq()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEMP = (2.0, 0.5, 0.999995)


def assert_grad_close(got, expected, rel=1e-4):
    """Gradients equal up to ``rel`` of the largest reference entry."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got.double().cpu(), expected.double().cpu(), rtol=0, atol=rel * scale)


def test_quantizer_matches_fairseq_on_the_gpu():
    torch.manual_seed(0)
    stock = GumbelVectorQuantizer(
        dim=64, num_vars=32, temp=TEMP, groups=2, combine_groups=False, vq_dim=32, time_first=True
    ).cuda()
    ours = SmoothedVectorQuantizer(
        64, 32, TEMP, 2, False, 32, True, smoothing="gumbel_hard", regularizer="diversity"
    ).cuda()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(4, 50, 64, device="cuda")
    upstream = torch.randn(4, 50, 32, device="cuda")
    results = []
    for quantizer in (stock, ours):
        quantizer.train()
        quantizer.set_num_updates(1000)
        inp = x.clone().requires_grad_()
        torch.cuda.manual_seed(11)
        out = quantizer(inp, produce_targets=True)
        diversity = (out["num_vars"] - out["prob_perplexity"]) / out["num_vars"]
        ((out["x"] * upstream).sum() + diversity).backward()
        results.append((out, inp.grad, {n: p.grad for n, p in quantizer.named_parameters()}))
    (s_out, s_grad, s_params), (o_out, o_grad, o_params) = results
    torch.testing.assert_close(o_out["x"], s_out["x"])
    assert torch.equal(o_out["targets"], s_out["targets"])
    for key in ("code_perplexity", "prob_perplexity"):
        torch.testing.assert_close(o_out[key], s_out[key], rtol=1e-5, atol=0)
    assert o_out["temp"] == s_out["temp"]
    assert_grad_close(o_grad, s_grad)
    for name, grad in s_params.items():
        assert_grad_close(o_params[name], grad)


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("chunk_size", [None, 16])
def test_knn_losses_on_the_gpu_equal_the_brute_force_reference(distance, chunk_size):
    gen = torch.Generator().manual_seed(3)
    logits = 3.0 * torch.randn(40, 60, 2, 64, generator=gen)
    mask = torch.rand(40, 60, generator=gen) > 0.2
    expected_loss = None
    for masked in (False, True):
        ref_input = logits.double().requires_grad_()
        expected = brute_force_knn(ref_input, 8, distance, mask if masked else None)
        (expected_grad,) = torch.autograd.grad(expected, ref_input)
        gpu = logits.cuda().requires_grad_()
        loss = knn_vertex_loss(gpu, k=8, distance=distance, mask=mask.cuda() if masked else None, chunk_size=chunk_size)
        (grad,) = torch.autograd.grad(loss, gpu)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert_grad_close(grad, expected_grad)
        if expected_loss is not None:
            assert abs(float(expected) - expected_loss) > 1e-3  # the mask matters
        expected_loss = float(expected)


def test_fused_softmax_and_knn_backward_on_the_gpu():
    """One autograd node for softmax and KNN-CE: its gradient under an upstream gradient
    on the softmax equals that of softmax + brute-force KNN (float64, CPU)."""
    gen = torch.Generator().manual_seed(4)
    logits = 2.0 * torch.randn(3000, 2, 128, generator=gen)
    upstream = torch.randn(3000, 2, 128, generator=gen)
    ref_input = logits.double().requires_grad_()
    ref = (torch.softmax(ref_input, -1) * upstream.double()).sum() + brute_force_knn(ref_input, 8, "ce")
    (expected,) = torch.autograd.grad(ref, ref_input)
    gpu = logits.cuda().requires_grad_()
    probs, knn = KnnVertexLoss(8, "ce").with_softmax(gpu)
    (got,) = torch.autograd.grad((probs * upstream.cuda()).sum() + knn, gpu)
    torch.testing.assert_close(probs.double().cpu(), torch.softmax(logits.double(), -1), rtol=0, atol=1e-6)
    assert float(knn) == pytest.approx(float(brute_force_knn(logits, 8, "ce")), rel=1e-5)
    assert_grad_close(got, expected)


@pytest.mark.parametrize("autocast", [False, True])
def test_quantizer_fused_training_path_on_the_gpu_equals_the_cpu(autocast):
    """The quantizer in training with KNN-CE on softmax smoothing (the fused node):
    the GPU against the CPU in float32; under fp16 autocast within fp16's precision."""
    torch.manual_seed(0)
    cpu = SmoothedVectorQuantizer(64, 64, TEMP, 2, False, 32, True, smoothing="softmax", regularizer="knn", knn_k=4)
    gpu = SmoothedVectorQuantizer(64, 64, TEMP, 2, False, 32, True, smoothing="softmax", regularizer="knn", knn_k=4)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 80, 64, generator=gen)
    upstream = torch.randn(6, 80, 32, generator=gen)
    outs = []
    for quantizer, device in ((cpu, "cpu"), (gpu, "cuda")):
        quantizer.train()
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast and device == "cuda"):
            out = quantizer(x.to(device))
            loss = (out["x"].float() * upstream.to(device)).sum() + 10.0 * out["knn_loss"]
        loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in quantizer.named_parameters()}))
    (c_out, c_grads), (g_out, g_grads) = outs
    rel = 2e-2 if autocast else 1e-4  # fp16 logits: about 3 significant digits
    assert float(g_out["knn_loss"]) == pytest.approx(float(c_out["knn_loss"]), rel=rel)
    for name, grad in c_grads.items():
        assert_grad_close(g_grads[name], grad, rel=5 * rel)
    assert torch.equal(g_out["usage_sums"].counts.cpu(), c_out["usage_sums"].counts) or autocast


@pytest.mark.slow
def test_tiny_fp16_pretraining_through_fairseq_on_the_gpu(tiny_manifests, tmp_path):
    result = run_hydra_train(
        CONFIG_DIR / "pretraining", "tiny_knn_ce",
        [f"task.data={tiny_manifests}", "common.cpu=false", "common.fp16=true",
         "optimization.max_update=20", "common.log_interval=5", "checkpoint.save_interval_updates=20"],
        run_dir=tmp_path / "run", timeout=140,  # inside gpu_check.sh's 150 s cap for the stage
    )
    records = parse_json_log(result.stdout)
    updates = records_of(records, "train_inner")
    assert [r["num_updates"] for r in updates][-1] == 20
    knn_weight = 0.1
    for record in updates:
        assert "loss_scale" in record  # fairseq's fp16 optimizer ran
        # [diversity, features_pen, knn]: the KNN term is loss_2 (in bits, weighted)
        assert record["loss_2"] == pytest.approx(knn_weight * record["knn_loss"] / math.log(2), abs=2e-3)
        assert 0 < record["knn_loss"] < 20
    valid = last_record(records, "valid")
    assert valid["valid_num_updates"] == 20 and "valid_knn_loss" in valid
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_last.pt").is_file()
