"""The fairseq-free core: smoothed vector quantization with the KNN-to-vertex loss.

Pure PyTorch; importing it never imports fairseq, so it can be used from any training
code. See ``regularizers`` for the equations.
"""
from .metrics import CodeUsage, codebook_stats, count_codes
from .quantizer import REGULARIZERS, SmoothedVectorQuantizer, VQVAEQuantizer
from .regularizers import KNN_DISTANCES, diversity_loss, knn_vertex_loss
from .smoothing import SMOOTHING_MODES, TemperatureSchedule, smooth

__all__ = [
    "CodeUsage",
    "KNN_DISTANCES",
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
]
