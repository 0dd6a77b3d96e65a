"""The fairseq-free core: smoothed vector quantization with the KNN-to-vertex loss.

Pure PyTorch; importing it never imports fairseq, so it can be used from any training
code. One idea a module, each opening with the equation it implements:

- ``rows``: the ``(N, G, M)`` row view of logits, masks as row weights, row blocks
- ``vertex_search``: the K rows nearest to every simplex vertex
- ``distributed``: that choice over the batch of all data-parallel workers
- ``knn``: the KNN-to-simplex-vertex loss (:class:`KnnVertexLoss`)
- ``diversity``: the prob perplexity and wav2vec 2.0's diversity loss
- ``smoothing``: logits -> a point on the simplex, and the temperature schedule
- ``metrics``: summable codebook statistics (:class:`CodeUsage`) and their metrics
- ``quantizer``: the smoothed quantizer and the VQ-VAE baseline
"""

from .diversity import diversity_loss
from .knn import KnnVertexLoss, knn_vertex_loss
from .metrics import CodeUsage, codebook_stats, count_codes, uniform_usage_ceiling
from .quantizer import REGULARIZERS, SmoothedVectorQuantizer, VQVAEQuantizer
from .smoothing import SMOOTHING_MODES, TemperatureSchedule, smooth
from .vertex_search import KNN_DISTANCES

__all__ = [
    "CodeUsage",
    "KNN_DISTANCES",
    "KnnVertexLoss",
    "REGULARIZERS",
    "SMOOTHING_MODES",
    "SmoothedVectorQuantizer",
    "TemperatureSchedule",
    "VQVAEQuantizer",
    "codebook_stats",
    "count_codes",
    "diversity_loss",
    "knn_vertex_loss",
    "smooth",
    "uniform_usage_ceiling",
]
