"""The GPU check: the quantizer, the KNN losses, the image model in half precision, two
processes with CUDA tensors and a tiny fp16 pretraining on CUDA.

Every test here is marked ``cuda`` and skipped when torch sees no CUDA device, so the
CPU suite passes by skipping them. On a GPU: ``pytest -m cuda`` (or
``scripts/gpu_check.sh``, which runs them in stages and the benchmarks on the GPU).
The precision tests of ``tests/core/test_precision.py`` (the VQ-VAE code search in
fp16 / bf16 against the float64 argmin, half-precision codebook gradients against the
float64 sums, the core under autocast with masks, CE and L2 against the values without
it) run on the GPU through their ``cuda`` parameter, in the same stage.

- the quantizer against fairseq's ``GumbelVectorQuantizer`` on the GPU, same weights
  and the same CUDA random stream: outputs, perplexities and gradients;
- the KNN losses on the GPU (local, masked, chunked; fused softmax + loss) against the
  brute-force definition in float64 on the CPU: values and gradients;
- the quantizer's fused training path on the GPU against the same module on the CPU,
  in float32 and under fp16 autocast;
- the tiny image model as an fp16 / bf16 model (``common.fp16`` / ``common.bf16``), VQ-VAE
  and KNN-CE: the codes against the float64 argmin of the latents, the losses against
  their float64 / brute-force values;
- two processes with CUDA tensors (gloo on one GPU; NCCL when there are two): the
  global KNN loss and gradient against the brute force on the concatenated batch, and
  ``CodeUsage.all_reduce`` of CPU and of CUDA sums;
- 20 updates of the tiny pretraining through ``fairseq-hydra-train`` with
  ``common.fp16=true`` on the GPU (marked ``slow``): the KNN term enters fairseq's fp16
  loss with its weight, the loss scaler is active, the run ends at update 20, and the
  first update's KNN loss is that of the same run in float32.
"""

import math

import pytest
import torch
import torch.distributed as dist

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq.modules import GumbelVectorQuantizer

from fairseq_knnvq.quantization import CodeUsage, KnnVertexLoss, SmoothedVectorQuantizer, knn_vertex_loss
from fairseq_run import CONFIG_DIR, last_record, parse_json_log, records_of, run_hydra_train
from gloo_workers import run_gloo_workers
from references import brute_force_knn, float64_argmin

fairseq_knnvq.register_with_fairseq()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEMP = (2.0, 0.5, 0.999995)
# Time limit of one fairseq-hydra-train run in the slow tests; scripts/gpu_check.sh's
# stage for them allows FAIRSEQ_RUNS of these and a margin (tests/core/test_gpu_check.py).
FAIRSEQ_RUN_TIMEOUT_S = 150
FAIRSEQ_RUNS = 2


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


# --- the image model in half precision -------------------------------------------------

IMAGE_MODEL = dict(channels=16, max_channels=32, num_res_blocks=1, code_dim=16, latent_vars=64, downsample_factor=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quantizer", ["vqvae", "knn_ce"])
def test_image_model_in_half_precision_on_the_gpu(quantizer, dtype):
    """The tiny image model as a half-precision model (fairseq's ``common.fp16`` /
    ``common.bf16``), one training forward and backward on the GPU: the VQ-VAE's codes
    are the float64 argmin of the latents it quantized (fp16 picked code 0 everywhere
    before the search moved to float32) and its loss their float64 value; the KNN loss
    is the brute-force loss of the logits its projection computed."""
    from fairseq_knnvq.models.vq_image_autoencoder import VQImageAutoencoder, VQImageAutoencoderConfig

    if quantizer == "vqvae":
        options = dict(quantizer="vqvae")
    else:
        options = dict(quantizer="smoothed", smoothing="softmax", regularizer="knn", knn_distance="ce", knn_k=4)
    torch.manual_seed(0)
    model = VQImageAutoencoder(VQImageAutoencoderConfig(**IMAGE_MODEL, **options)).to("cuda", dtype).train()
    seen = {}
    if quantizer == "vqvae":
        model.quantizer.register_forward_hook(lambda module, args, out: seen.update(z=args[0].detach()))
    else:
        model.quantizer.weight_proj.register_forward_hook(lambda module, args, out: seen.update(logits=out.detach()))
    images = (torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).to("cuda", dtype)
    out = model(images)
    loss = (out["x"].float() - images.float()).pow(2).mean() + sum(out[key] for key in out["training_losses"])
    loss.backward()
    assert out["x"].dtype == dtype
    if quantizer == "vqvae":
        z = seen["z"].reshape(-1, IMAGE_MODEL["code_dim"])
        codebook = model.quantizer.codebooks[0]
        codes = out["codes"].reshape(-1).cpu()
        expected = float64_argmin(z, codebook)
        assert float((codes == expected).double().mean()) >= 0.99
        chosen = codebook.detach().double().cpu()[codes]
        expected_loss = (1.0 + model.quantizer.beta) * (chosen - z.double().cpu()).pow(2).mean()
        assert float(out["vq_loss"].detach()) == pytest.approx(float(expected_loss), rel=1e-5)
        assert model.quantizer.codebooks.grad.dtype == dtype
    else:
        logits = seen["logits"].double().cpu().view(-1, 1, IMAGE_MODEL["latent_vars"]) / model.quantizer.curr_temp
        assert float(out["knn_loss"].detach()) == pytest.approx(float(brute_force_knn(logits, 4)), rel=1e-5)
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all()), name


# --- two processes with CUDA tensors ------------------------------------------------------


def two_process_inputs():
    gen = torch.Generator().manual_seed(21)
    logits = [3.0 * torch.randn(n, 2, 32, generator=gen) for n in (300, 170)]
    masks = [torch.rand(n, generator=gen) > 0.2 for n in (300, 170)]
    return logits, masks


def cuda_worker_results(rank):
    """One worker: global KNN on CUDA logits; usage sums on the CPU (what
    ``code_histograms.quantizer_usage`` returns) and on the GPU, all-reduced."""
    backend = str(dist.get_backend())
    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    logits, masks = two_process_inputs()
    out = {"backend": backend}
    for distance in ("ce", "l2"):
        mine = logits[rank].to(device).requires_grad_()
        loss = KnnVertexLoss(4, distance, global_=True)(mine, masks[rank].to(device))
        (grad,) = torch.autograd.grad(loss, mine)
        out[distance] = {"loss": float(loss), "grad": grad.cpu()}
    for where, dev in (("cpu", torch.device("cpu")), ("cuda", device)):
        usage = CodeUsage.from_logits(logits[rank].to(dev), mask=masks[rank].to(dev)).all_reduce()
        out["usage_" + where] = {
            "device": usage.counts.device.type,
            "counts": usage.counts.cpu(),
            "prob_sums": usage.prob_sums.cpu(),
        }
    return out


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")),
    ],
)
def test_two_processes_with_cuda_tensors(backend, tmp_path):
    results = run_gloo_workers(cuda_worker_results, 2, tmp_path, backend=backend)
    logits, masks = two_process_inputs()
    sizes = [x.shape[0] for x in logits]
    valid = [int(m.sum()) for m in masks]
    everything = torch.cat(logits).double().requires_grad_()
    for distance in ("ce", "l2"):
        expected = brute_force_knn(everything, 4, distance, torch.cat(masks))
        (expected_grad,) = torch.autograd.grad(expected, everything)
        for rank, (result, part) in enumerate(zip(results, expected_grad.split(sizes))):
            assert result["backend"] == backend
            assert result[distance]["loss"] == pytest.approx(float(expected), rel=1e-5)
            # (N_r / N) * grad_r is the single-process gradient on worker r's rows
            assert_grad_close(result[distance]["grad"] * valid[rank] / sum(valid), part)
    expected_usage = CodeUsage.from_logits(logits[0], mask=masks[0]) + CodeUsage.from_logits(logits[1], mask=masks[1])
    for result in results:
        for where in ("cpu", "cuda"):
            usage = result["usage_" + where]
            assert usage["device"] == where  # back where the sums were
            assert torch.equal(usage["counts"], expected_usage.counts)
            torch.testing.assert_close(usage["prob_sums"], expected_usage.prob_sums, rtol=1e-6, atol=0)


# --- fairseq-hydra-train in fp16 ---------------------------------------------------------


def _tiny_pretraining(tiny_manifests, run_dir, *overrides):
    result = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [
            f"task.data={tiny_manifests}",
            "common.cpu=false",
            "optimization.max_update=20",
            "common.log_interval=1",
            "checkpoint.save_interval_updates=20",
            *overrides,
        ],
        run_dir=run_dir,
        timeout=FAIRSEQ_RUN_TIMEOUT_S,
    )
    return parse_json_log(result.stdout)


@pytest.mark.slow
def test_tiny_fp16_pretraining_through_fairseq_on_the_gpu(tiny_manifests, tmp_path):
    records = _tiny_pretraining(tiny_manifests, tmp_path / "run", "common.fp16=true")
    reference = records_of(_tiny_pretraining(tiny_manifests, tmp_path / "fp32"), "train_inner")
    updates = records_of(records, "train_inner")
    assert [r["num_updates"] for r in updates][-1] == 20
    knn_weight = 0.1
    for record in updates:
        assert "loss_scale" in record  # fairseq's fp16 optimizer ran
        # [diversity, features_pen, knn]: the KNN term is loss_2 (in bits, weighted)
        assert record["loss_2"] == pytest.approx(knn_weight * record["knn_loss"] / math.log(2), abs=2e-3)
    # the first update (same seed, weights and batch) against the float32 run: fp16
    # rounds the logits to about 3 significant digits
    first = {r["num_updates"]: r for r in updates}[1]
    first_fp32 = {r["num_updates"]: r for r in reference}[1]
    assert first["knn_loss"] == pytest.approx(first_fp32["knn_loss"], rel=3e-2)
    valid = last_record(records, "valid")
    assert valid["valid_num_updates"] == 20 and "valid_knn_loss" in valid
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_last.pt").is_file()
