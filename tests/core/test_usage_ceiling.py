"""The usage ceiling: how many distinct codes uniform use shows for the vectors counted."""

import math

import pytest
import torch

from fairseq_knnvq.quantization import CodeUsage, codebook_stats, uniform_usage_ceiling


@pytest.mark.parametrize("entries,n", [(320, 1000), (320, 200), (64, 1024), (16384, 4096)])
def test_ceiling_is_the_expected_number_of_distinct_uniform_draws(entries, n):
    assert uniform_usage_ceiling(n, entries) == pytest.approx(entries * (1 - (1 - 1 / entries) ** n), rel=1e-12)
    # a simulation of uniform draws: the mean number of distinct codes over many batches
    gen = torch.Generator().manual_seed(0)
    trials = 400
    draws = torch.randint(entries, (trials, n), generator=gen)
    distinct = torch.tensor([float(row.unique().numel()) for row in draws])
    standard_error = float(distinct.std()) / math.sqrt(trials)
    # within 4 standard errors (at most ~0.6 codes here, against ceilings of 64-3600), or
    # 0.05 codes where every batch shows the same number
    assert abs(float(distinct.mean()) - uniform_usage_ceiling(n, entries)) < max(4 * standard_error, 0.05)


def test_ceiling_edge_cases():
    assert uniform_usage_ceiling(0, 320) == 0.0
    assert uniform_usage_ceiling(1, 320) == pytest.approx(1.0, rel=1e-12)  # one vector, one code
    assert uniform_usage_ceiling(5, 1) == 1.0
    assert uniform_usage_ceiling(1e7, 320) == pytest.approx(320.0, rel=1e-12)
    with pytest.raises(ValueError, match="num_vars"):
        uniform_usage_ceiling(10, 0)


def test_codebook_stats_give_the_ceiling_of_the_vectors_counted():
    # 2 groups of 320 entries, 1,000 vectors counted per group, 600 distinct codes used
    counts = torch.zeros(2, 320, dtype=torch.long)
    counts[0, :300] = 3
    counts[0, 0] += 100
    counts[1, :300] = 3
    counts[1, 300:] = 5
    assert counts.sum(-1).tolist() == [1000, 1000]
    stats = codebook_stats(CodeUsage(counts=counts))
    ceiling = 2 * 320 * (1 - (1 - 1 / 320) ** 1000)
    assert stats["used_codes"] == 620
    assert stats["used_codes_ceiling"] == pytest.approx(ceiling, rel=1e-12)
    assert stats["code_usage_of_ceiling"] == pytest.approx(620 / ceiling, rel=1e-12)
    assert stats["used_codes_ceiling"] == pytest.approx(612.0, abs=0.1)  # not 640: 1,000 draws
