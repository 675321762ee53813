"""PipeFusion's numbers computed in one process, the plain way, for tests and error measurements.

No stages and no messages: for each (step, patch) of the schedule, every block runs on the patch with
the stale-K/V attention backend, then the sampler step updates the patch. That is the same arithmetic
the pipeline does, because a stage sees its own layers' buffers refreshed in the same (step, patch)
order, each patch starts from its own state after the previous step, and the text stream is carried
per patch in both, or once a step in both where the adapter allows it (``pipefusion_text.py``).
"""

from __future__ import annotations

import torch

from ..cond_batch import branch_forwards
from ..models.adapter import Adapter
from ..samplers import step_patch
from ..sampling import SamplingPlan, apply_cfg, denoised_from
from .patch_kv_buffer import StaleKVAttention
from .pipefusion_text import carries_text, item_conds, uses_text_once
from .pipefusion_schedule import patch_bounds, stage_work


@torch.no_grad()
def pipefusion_reference(adapter: Adapter, plan: SamplingPlan, num_patches: int,
                         warmup_steps: int) -> torch.Tensor:
    """Final tokens (B, N, 64) of PipeFusion sampling with ``num_patches`` patches after ``warmup_steps``."""
    if warmup_steps < 1 and plan.total_calls > 0:
        raise ValueError("PipeFusion needs warmup_steps >= 1 to fill its K/V buffers")
    num_tokens = plan.x.shape[1]
    bounds = patch_bounds(num_tokens, num_patches)
    branches = [plan.positive] + ([plan.negative] if plan.negative is not None else [])
    forwards = branch_forwards(branches, plan.x.shape[0], plan.batch_cfg)  # one of both, or one per branch
    text_once = uses_text_once(adapter)
    backends = [StaleKVAttention(num_tokens, text_once=text_once) for _ in forwards.conds]  # K/V buffers per forward
    with_text, textless = item_conds(forwards.conds, text_once)
    x, state = plan.begin(plan.x.clone())  # tokens (B, N, 64) and the sampler state
    step_noise = plan.step_noise(x.device)
    saved = adapter.seam.backend
    try:
        warmup = plan.program.calls_before_step(warmup_steps)  # the warm-up steps' model calls
        for work in stage_work(plan.total_calls, warmup, num_patches):
            start, stop = (0, num_tokens) if work.is_warmup else bounds[work.patch]
            sigma = plan.call_sigmas[work.step]
            part = x[:, start:stop]  # (B, n, 64)
            seen = plan.inpaint.model_input(part, sigma, start) if plan.inpaint is not None else part
            model_in = plan.prediction.model_input(seen, sigma)
            outputs = []
            for backend, cond in zip(backends, with_text if carries_text(work) else textless):
                adapter.seam.backend = backend.at(start, stop)
                # (B, n, 64) -> (2B, n, 64) when the branches are stacked
                outputs.append(adapter.velocity(forwards.rows(model_in), plan.image_ids[start:stop], cond,
                                                forwards.rows(plan.model_sigmas[work.step] * part.new_ones(len(part)))))
            denoised = [denoised_from(seen, sigma, velocity, plan.prediction)
                        for velocity in forwards.branches(outputs)]  # positive first
            guided = apply_cfg(denoised[0], denoised[1] if len(denoised) > 1 else None, plan.cfg)
            if plan.inpaint is not None:
                guided = plan.inpaint.model_output(guided, start)
            state = step_patch(plan.step, x, guided, plan.sigmas, work.step, state, start, stop, step_noise,
                               denoised[1] if len(denoised) > 1 else None)
    finally:
        adapter.seam.backend = saved
    return x


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the whole latent."""
    return float((actual - expected).norm() / expected.norm())


def serial_tokens(adapter: Adapter, plan: SamplingPlan) -> torch.Tensor:
    """Final tokens of ordinary serial sampling of ``plan`` (the ground truth PipeFusion approximates)."""
    from ..sampling import run_loop

    return run_loop(adapter, plan, lambda x, sigma, cond: adapter.velocity(x, plan.image_ids, cond, sigma))


def error_table(adapter: Adapter, plan: SamplingPlan, patches: list[int],
                warmups: list[int]) -> dict[tuple[int, int], float]:
    """{(patches, warmup_steps): relative error of PipeFusion's final latent against serial sampling}."""
    truth = serial_tokens(adapter, plan)
    return {(m, k): relative_error(pipefusion_reference(adapter, plan, m, k), truth) for m in patches for k in warmups}
