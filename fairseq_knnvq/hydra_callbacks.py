"""Hydra callbacks that the SLURM run configs (``configs/run_config/slurm_*.yaml``) list
under ``hydra.callbacks``. Hydra's submitit launcher pickles them with the job, so
``on_job_start`` runs in every SLURM task, before fairseq's own start-up.

:class:`SlurmTaskOnCpu`: fairseq reads a SLURM task's device from ``SLURM_LOCALID`` and,
when it is above 0, calls ``torch.cuda.set_device`` (``fairseq/distributed/utils.py``,
``infer_init_method``), which fails where there is no GPU (``common.cpu=true``, a CPU
build of torch), so the second task of a CPU job dies before its rendezvous and the
first one waits for it forever. On a machine without CUDA the callback sets
``SLURM_LOCALID=0`` in the task's own environment (device ids mean nothing on CPU);
rank, world size and the rendezvous address still come from SLURM through fairseq
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``scontrol show hostnames``). With CUDA it does
nothing.
"""

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

logger = logging.getLogger(__name__)


class SlurmTaskOnCpu(Callback):
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        import torch

        if "SLURM_LOCALID" not in os.environ or torch.cuda.is_available():
            return
        if os.environ["SLURM_LOCALID"] != "0":
            logger.info(
                "no CUDA: SLURM task %s (SLURM_LOCALID=%s) runs on CPU; SLURM_LOCALID=0 so that "
                "fairseq does not select a GPU",
                os.environ.get("SLURM_PROCID"),
                os.environ["SLURM_LOCALID"],
            )
            os.environ["SLURM_LOCALID"] = "0"
