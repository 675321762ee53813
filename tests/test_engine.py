"""Serial engine behaviour on the tiny model: determinism, CFG, image-to-image, events, cancel, bad input."""

import pytest
import torch

from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.request import GenerationRequest, ModelRef, SigmaShift
from comfyui_xdit.sampling import GenerationCancelled

REF = ModelRef("tiny:flux")


@pytest.fixture(scope="module")
def engine():
    return Engine(load_model(REF))


def _request(**overrides) -> GenerationRequest:
    positive, negative = tiny_conditioning(REF, seed=overrides.get("seed", 3))
    options = dict(model=REF, latent=torch.zeros(1, 16, 8, 8), positive=positive, seed=3, steps=3)
    if overrides.get("cfg", 1.0) != 1.0:
        options["negative"] = negative
    options.update(overrides)
    return GenerationRequest(**options)


def test_same_seed_same_latent_and_seed_matters(engine):
    a, b = engine.generate(_request()), engine.generate(_request())
    assert torch.equal(a, b)
    assert a.shape == (1, 16, 8, 8) and torch.isfinite(a).all()
    assert not torch.allclose(a, engine.generate(_request(seed=4)))


def test_cfg_uses_negative_and_cfg_one_ignores_it(engine):
    positive, negative = tiny_conditioning(REF, seed=3)
    plain = engine.generate(_request())
    with_negative_at_one = engine.generate(_request(negative=negative))
    assert torch.equal(plain, with_negative_at_one)  # ComfyUI skips the uncond branch at cfg 1
    assert not torch.allclose(plain, engine.generate(_request(cfg=3.0)))


def test_empty_four_channel_latent_is_widened_like_comfyui(engine):
    assert torch.equal(engine.generate(_request(latent=torch.zeros(1, 4, 8, 8))), engine.generate(_request()))


def test_image_to_image_keeps_the_input_close(engine):
    source = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    light = engine.generate(_request(latent=source, denoise=0.2, steps=2))
    heavy = engine.generate(_request(latent=source, denoise=1.0, steps=2))
    assert (light - source).norm() < (heavy - source).norm()
    assert torch.equal(engine.generate(_request(latent=source, denoise=0.0)), source)


def test_resolution_shift_changes_sigmas(engine):
    default = engine.generate(_request())
    shifted = engine.generate(_request(shift=SigmaShift(mode="resolution", width=1024, height=1024, max_shift=2.0)))
    assert not torch.allclose(default, shifted)


def test_step_events_and_cancel(engine):
    events = []
    engine.generate(_request(steps=3), on_step=events.append)
    assert [(e.step, e.total) for e in events] == [(1, 3), (2, 3), (3, 3)]
    assert events[-1].preview.shape == (1, 16, 8, 8)
    seen = []
    with pytest.raises(GenerationCancelled, match="before step 2"):
        engine.generate(_request(steps=3), on_step=seen.append, should_stop=lambda step: step == 2)
    assert len(seen) == 2


@pytest.mark.parametrize("overrides,message", [
    (dict(latent=torch.zeros(1, 16, 7, 8)), "divisible by 16"),
    (dict(latent=torch.ones(1, 4, 8, 8)), "EmptySD3LatentImage"),
    (dict(sampler="dpm_adaptive"), "euler, euler_cfg_pp, euler_ancestral"),
    (dict(scheduler="karas"), "simple, sgm_uniform, karras"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(denoise=1.5), "denoise must be within"),
])
def test_bad_input_names_the_fix(engine, overrides, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(_request(**overrides))


def test_cfg_without_negative_is_refused():
    positive, _ = tiny_conditioning(REF, seed=0)
    with pytest.raises(ValueError, match="negative conditioning"):
        GenerationRequest(model=REF, latent=torch.zeros(1, 16, 8, 8), positive=positive, cfg=2.0)
