"""PipeFusion's prompt once a step (``parallel/pipefusion_text.py``): a family that opts in must run its
blocks on an empty text stream and get, from the cached text K/V, exactly what the prompt would give.

A patch run without text right after the same patch ran with it (so every layer's cached text K/V are
the ones its own text stream would make) equals that run; after another prompt's run it equals that
prompt's run, so the text really comes from the cache. Multi-rank PipeFusion equals its single-process
reference with the prompt once a step in ``test_pipefusion.py`` / ``test_pipefusion_hybrid.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_xdit.model_loader import load_model, model_spec, tiny_conditioning
from comfyui_xdit.models.families import FAMILIES, family_of
from comfyui_xdit.parallel.patch_kv_buffer import StaleKVAttention
from comfyui_xdit.parallel.pipefusion_schedule import Work
from comfyui_xdit.parallel.pipefusion_text import carries_text, without_text
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import prepare_plan

TEXT_ONCE = [f"tiny:{fam.id}" for fam in FAMILIES if fam.text_once]
IMAGE_LATENT, VIDEO_LATENT = (8, 8), (3, 4, 8)
IMAGE_WITH_FRAME_FORMAT = {"tiny:qwen-image"}  # ComfyUI's Wan21 latent format, but the sampler takes an image


def latent_size(model: str) -> tuple[int, ...]:
    video = family_of(model_spec(ModelRef(model))).latent_dimensions == 3 and model not in IMAGE_WITH_FRAME_FORMAT
    return VIDEO_LATENT if video else IMAGE_LATENT


def patch_velocity(adapter, backend: StaleKVAttention, plan, start: int, stop: int, cond) -> torch.Tensor:
    adapter.seam.backend = backend.at(start, stop)
    sigma = plan.model_sigmas[1] * torch.ones(plan.x.shape[0])
    return adapter.velocity(plan.x[:, start:stop], plan.image_ids[start:stop], cond, sigma)


@pytest.mark.parametrize("model", TEXT_ONCE)
def test_a_patch_without_text_attends_over_the_cached_text(model: str) -> None:
    ref = ModelRef(model)
    adapter = load_model(ref)
    positive, negative = tiny_conditioning(ref, seed=3)
    other = dataclasses.replace(positive, context=negative.context)  # another prompt, the same pooled vector
    spec = model_spec(ref)
    latent = torch.randn(1, spec.latent_channels, *latent_size(model), generator=torch.Generator().manual_seed(0))
    plan = prepare_plan(adapter, GenerationRequest(model=ref, latent=latent, positive=positive, negative=negative,
                                                   seed=1, steps=3, cfg=1.0))
    tokens = plan.x.shape[1]
    start, stop = tokens // 2, tokens
    saved = adapter.seam.backend
    try:
        backend = StaleKVAttention(tokens, text_once=True)
        patch_velocity(adapter, backend, plan, 0, tokens, positive)  # warm-up: fills every layer's image K/V
        with_text = patch_velocity(adapter, backend, plan, start, stop, positive)
        textless = patch_velocity(adapter, backend, plan, start, stop, without_text(positive))
        torch.testing.assert_close(textless, with_text, rtol=1e-5, atol=1e-5)
        with_other = patch_velocity(adapter, backend, plan, start, stop, other)
        textless = patch_velocity(adapter, backend, plan, start, stop, without_text(positive))
        torch.testing.assert_close(textless, with_other, rtol=1e-5, atol=1e-5)  # the cache, not the cond's tokens
        assert (with_other - with_text).abs().max() > 1e-3  # the prompts differ, so the check above can fail
    finally:
        adapter.seam.backend = saved


def test_a_textless_item_before_any_prompt_is_refused() -> None:
    backend = StaleKVAttention(4, text_once=True)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="first patch of every step must carry the text"):
        backend(q, q, q, text_len=0, layer=0)


def test_the_first_patch_and_warm_up_carry_the_prompt() -> None:
    assert carries_text(Work(step=0, patch=None)) and carries_text(Work(step=3, patch=0))
    assert not carries_text(Work(step=3, patch=1))
    cond = tiny_conditioning(ModelRef("tiny:flux"), seed=0)[0]
    empty = without_text(cond)
    assert empty.context.shape[1] == 0 and torch.equal(empty.pooled, cond.pooled) and empty.guidance == cond.guidance
