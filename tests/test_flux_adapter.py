"""The Flux adapter's forward against an independent BFL-layout reference, and its latent packing."""

import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.models.flux import FluxAdapter
from comfyui_xdit.models.flux_checkpoint import TINY_FLUX, FluxSpec, random_bfl_state

from flux_reference import flux_forward


def _compare(spec: FluxSpec, batch: int = 1, sigma: float = 0.7, h: int = 8, w: int = 12):
    sd = random_bfl_state(spec, seed=3)
    adapter = FluxAdapter.from_state_dict(dict(sd))
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(batch, 16, h, w, generator=g)
    cond = Conditioning(torch.randn(1, 5, spec.joint_attention_dim, generator=g),
                        torch.randn(1, spec.pooled_projection_dim, generator=g), guidance=4.0)
    tokens, ids = adapter.pack(latent), adapter.image_ids(h, w)
    sigmas = torch.full((batch,), sigma)
    ours = adapter.velocity(tokens, ids, cond, sigmas)
    context, pooled = cond.for_batch(batch)
    ref = flux_forward(sd, tokens, ids, context, pooled, sigmas, torch.full((batch,), 4.0),
                       spec.num_attention_heads, spec.axes_dims_rope)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    return ours


def test_forward_matches_plain_bfl_reference_dev():
    _compare(TINY_FLUX, batch=2)


def test_forward_matches_plain_bfl_reference_schnell_no_guidance():
    spec = FluxSpec(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                    joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=False)
    _compare(spec, sigma=0.3)


def test_pack_unpack_round_trip_and_ids_follow_rows():
    latent = torch.randn(2, 16, 6, 10)
    tokens = FluxAdapter.pack(latent)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(FluxAdapter.unpack(tokens, 6, 10), latent)
    # token 0 holds latent[:, :, 0:2, 0:2] channel-major
    assert torch.equal(tokens[0, 0].view(16, 2, 2), latent[0, :, 0:2, 0:2])
    ids = FluxAdapter.image_ids(6, 10)
    assert ids.shape == (15, 3)
    assert ids[6].tolist() == [0.0, 1.0, 1.0]  # row 1, col 1 (5 tokens a row)


def test_bf16_weights_run_in_bf16():
    adapter = FluxAdapter.from_state_dict(random_bfl_state(TINY_FLUX, 0), dtype=torch.bfloat16)
    assert adapter.dtype == torch.bfloat16
    cond = Conditioning(torch.randn(1, 4, 64), torch.randn(1, 32))
    out = adapter.velocity(torch.randn(1, 16, 64), adapter.image_ids(8, 8), cond, torch.tensor([0.5]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_embed_context_is_embed_without_tokens():
    """A later PipeFusion stage gets temb and rotary from ``embed_context``; they equal ``embed``'s."""
    adapter = FluxAdapter.from_state_dict(random_bfl_state(TINY_FLUX, seed=3))
    g = torch.Generator().manual_seed(2)
    cond = Conditioning(torch.randn(1, 5, TINY_FLUX.joint_attention_dim, generator=g),
                        torch.randn(1, TINY_FLUX.pooled_projection_dim, generator=g), guidance=4.0)
    ids = adapter.image_ids(8, 8)[4:12]  # a patch in the middle of the image
    sigmas = torch.tensor([0.7, 0.2])
    full = adapter.embed(torch.randn(2, 8, 64, generator=g), ids, cond, sigmas)
    context = adapter.embed_context(ids, cond, sigmas)
    torch.testing.assert_close(context.temb, full.temb, rtol=0, atol=0)
    for ours, theirs in zip(context.rotary, full.rotary):
        assert ours.shape == (5 + 8, TINY_FLUX.attention_head_dim)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert adapter.text_len(cond) == 5 and adapter.hidden_size == full.hidden.shape[-1]
