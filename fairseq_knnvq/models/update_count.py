"""The update count fairseq's trainer gave a model."""

from __future__ import annotations

from typing import Optional

import torch


def model_num_updates(model: torch.nn.Module) -> Optional[int]:
    """``num_updates`` as the trainer set it (``set_num_updates``, also right after a
    checkpoint load) on the model or a module it wraps (DDP's ``module`` included); None
    when no module keeps it."""
    for module in model.modules():
        value = getattr(module, "num_updates", None)
        if isinstance(value, int):
            return value
    return None
