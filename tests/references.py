"""Reference implementations shared by several test modules."""

import torch


def brute_force_knn(logits, k, distance="ce", mask=None):
    """L_KNN by its definition in float64: every distance, sorted per vertex, the K
    smallest averaged (differentiable through the kept values). ``logits``: (..., G, M);
    ``mask`` over the leading positions, True where valid."""
    rows = logits.reshape(-1, *logits.shape[-2:]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    log_p = torch.log_softmax(rows, -1)
    if distance == "ce":
        d = -log_p
    else:
        p = log_p.exp()
        d = 1 - 2 * p + p.pow(2).sum(-1, keepdim=True)
    k_eff = min(k, d.shape[0])
    return d.sort(dim=0).values[:k_eff].sum() / (d.shape[1] * d.shape[2] * k_eff)


def float64_argmin(z, codebook):
    """The nearest codeword ``argmin_m ||z_n - e_m||^2`` of rows ``z`` ``(N, d)`` in a
    codebook ``(M, d)``, in float64 on the CPU (the ``||z||^2`` term included)."""
    z, e = z.detach().double().cpu(), codebook.detach().double().cpu()
    return (z.pow(2).sum(-1, keepdim=True) - 2.0 * z @ e.t() + e.pow(2).sum(-1)).argmin(-1)
