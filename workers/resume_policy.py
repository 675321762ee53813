"""What an attempt of a job asks of the loop so that a retry can resume: checkpoints every step (all but data
parallel), PipeFusion's stale K/V in them while it is small enough to ship each step, and the job's last
checkpoint to resume from on a retry (``comfyui_xdit/resume.py``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from comfyui_xdit.model_loader import model_spec
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.resume import pipefusion_kv_bytes

from .job import Job

logger = logging.getLogger(__name__)

KV_CHECKPOINT_LIMIT = 256 << 20  # bytes of PipeFusion K/V a job's checkpoints may carry to the driver each step


def resumable(job: Job, spec_of: Callable[[ModelRef], Any] = model_spec,
              kv_limit_bytes: int = KV_CHECKPOINT_LIMIT) -> GenerationRequest:
    """The request an attempt runs: asking for a checkpoint with every step where the loop can resume (all
    but data parallel), and resumed from the job's last one on a retry (the same latent as one run).
    PipeFusion's checkpoints carry its ranks' stale K/V up to ``kv_limit_bytes`` (``spec_of``: the model's
    architecture; None when unknown here, then no K/V); beyond, a resumed run re-warms one step over the
    whole latent (resume.py)."""
    request = job.request
    if request.parallel.data_degree > 1:
        return request  # each group's rows are spread over its ranks: a retry starts again
    request = dataclasses.replace(request, checkpoints=True)
    if request.parallel.pipefusion_degree > 1:
        spec = spec_of(request.model)
        kv = float("inf") if spec is None else pipefusion_kv_bytes(
            spec, tuple(request.latent.shape), 2 if request.negative is not None and request.cfg != 1.0 else 1,
            request.model.torch_dtype.itemsize)
        if kv > kv_limit_bytes:
            logger.info("job %s: PipeFusion checkpoints without the %.1f GiB of stale K/V (limit %.2f GiB): a retry "
                        "re-warms one step", job.id, kv / 2**30, kv_limit_bytes / 2**30)
            request = dataclasses.replace(request, checkpoint_kv=False)
    if job.checkpoint is not None:
        logger.warning("job %s: resuming after model call %d (the last step whose checkpoint arrived)", job.id,
                       job.checkpoint.calls)
        request = dataclasses.replace(request, resume=job.checkpoint)
    return request
