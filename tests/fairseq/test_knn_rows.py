"""Rows per vertex at paper scale: wav2vec2_knnvq built from configs/pretraining/base_knn_ce
(BASE, 2 x 320 codes, K = 8) on one worker's batch of the recipe's size logs how many rows
its KNN search saw, and warns, because one worker's batch has fewer rows than K * M (the
reason the config picks neighbours over all workers)."""

import logging

import pytest
import torch
from omegaconf import OmegaConf

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq.dataclass.utils import merge_with_parent

from fairseq_knnvq.criterions.wav2vec_knnvq import Wav2vecKnnVqCriterion
from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel
from fairseq_run import CONFIG_DIR

fairseq_knnvq.register_with_fairseq()


def _variant(name):
    own = OmegaConf.load(CONFIG_DIR / "pretraining" / f"{name}.yaml")
    defaults = own.pop("defaults")
    return OmegaConf.merge(
        *(own if d == "_self_" else OmegaConf.load(CONFIG_DIR / "pretraining" / f"{d}.yaml") for d in defaults)
    )


@pytest.mark.slow
def test_base_batch_logs_the_rows_its_knn_search_saw_and_warns(caplog):
    cfg = _variant("base_knn_ce")
    torch.manual_seed(0)
    model = Wav2Vec2KnnVqModel.build_model(merge_with_parent(Wav2Vec2KnnVqConfig(), cfg.model))
    criterion = Wav2vecKnnVqCriterion(
        None,
        infonce=True,
        loss_weights=list(cfg.criterion.loss_weights),
        knn_weight=cfg.criterion.knn_weight,
        knn_log_interval=1,
    )
    # One worker's batch at the recipe's max_tokens: 5 crops of max_sample_size samples
    # (5 * 250,000 <= 1,400,000 < 6 * 250,000), as fairseq's batching by size makes them.
    max_tokens, crop = cfg.dataset.max_tokens, cfg.task.max_sample_size
    clips = max_tokens // crop
    sample = {"id": torch.arange(clips), "net_input": {"source": 0.1 * torch.randn(clips, crop)}}
    model.train()
    k, entries = cfg.model.knn_k, 320
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fairseq_knnvq.criterions.usage_logging"):
        _, sample_size, log = criterion(model, sample)
    # The rows the search saw are the masked frames that fairseq counts (sample_size: the
    # InfoNCE targets), counted here by fairseq's own code, not by the quantizer.
    assert (k, entries) == (8, model.cfg.latent_vars)
    rows = float(log["knn_rows"])
    assert rows == sample_size
    assert float(log["knn_rows_per_vertex"]) == pytest.approx(sample_size / (k * entries), rel=1e-6)
    # 5 crops of 781 frames each; about half of them masked: fewer rows than K * M = 2,560
    frames = clips * int(model._get_feat_extract_output_lengths(torch.tensor(crop)))
    assert frames == 3905
    assert 0.4 * frames < rows < k * entries
    warnings = [r.getMessage() for r in caplog.records if "KNN rows per vertex" in r.getMessage()]
    assert len(warnings) == 1 and criterion.check_knn_rows.done  # once per run (tests/e2e: over 3 updates)
    assert f"KNN rows per vertex {rows / (k * entries):.2f} < 1" in warnings[0]
    assert f"chooses from {rows:.0f} rows" in warnings[0] and f"K <= {int(rows // entries)} gives" in warnings[0]
    # base_knn_ce picks neighbours over all workers; this is one process
    assert model.cfg.knn_global and "model.knn_global is on, but this run has one worker" in warnings[0]
