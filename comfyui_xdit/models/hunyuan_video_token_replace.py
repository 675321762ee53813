"""HunyuanVideo's token replace (HunyuanImageToVideo's "v2 (replace)"): the first latent frame's tokens are modulated
by a second embedding, as ComfyUI's ``HunyuanVideo.forward_orig`` does with ``guiding_frame_index``.

What stock does (comfy/ldm/hunyuan_video/model.py, v0.3.64):
- a second vector: ``time_in`` of the sinusoid of ``guiding_frame_index`` itself (0 from the node: timestep 0, not
  scaled by 1000) plus the pooled CLIP vector's embedding, then the guidance embedding added to both vectors;
- the tokens of latent frame 0 (``frame_tokens``: one frame's rows x columns) take every shift, scale and gate from
  that vector, in every double and single block and in the final layer; the other video tokens and the text take
  the usual one (the token refiner keeps the sampling timestep).

diffusers' ``HunyuanVideoTokenReplace*`` blocks do the same in the blocks (their token-replace vector carries no
guidance, and their output norm no token replace), so ours run the stock numbers through diffusers' ordinary blocks'
modules. The video tokens are frame-major, so a contiguous shard or PipeFusion patch holds frame 0's tokens as a
prefix: ``first`` is how many of its own tokens that prefix has (0: the plain block, exactly).
"""

from __future__ import annotations

import torch


def _modulate(x: torch.Tensor, first: int, shift: torch.Tensor, scale: torch.Tensor, tr_shift: torch.Tensor,
              tr_scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with the replace modulation on the first ``first`` tokens: x (B, N, hidden),
    the rest (B, hidden)."""
    head = x[:, :first] * (1 + tr_scale[:, None]) + tr_shift[:, None]
    tail = x[:, first:] * (1 + scale[:, None]) + shift[:, None]
    return torch.cat([head, tail], dim=1)


def _gated(x: torch.Tensor, first: int, gate: torch.Tensor, tr_gate: torch.Tensor) -> torch.Tensor:
    """``x * gate`` with the replace gate on the first ``first`` tokens: x (B, N, hidden), gates (B, hidden)."""
    return torch.cat([x[:, :first] * tr_gate[:, None], x[:, first:] * gate[:, None]], dim=1)


def double_block(block: torch.nn.Module, hidden: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                 replace: torch.Tensor, first: int,
                 rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``HunyuanVideoTransformerBlock`` with the first ``first`` video tokens modulated by ``replace``
    (B, hidden) instead of ``temb`` (B, hidden): hidden (B, N_local, hidden), text (B, L, hidden)."""
    norm1 = block.norm1
    # (B, 6 * hidden) -> 6 x (B, hidden): shift, scale, gate of the attention, then of the feed-forward
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1.linear(norm1.silu(temb)).chunk(6, dim=1)
    tr_shift_msa, tr_scale_msa, tr_gate_msa, tr_shift_mlp, tr_scale_mlp, tr_gate_mlp = \
        norm1.linear(norm1.silu(replace)).chunk(6, dim=1)
    normed = _modulate(norm1.norm(hidden), first, shift_msa, scale_msa, tr_shift_msa, tr_scale_msa)
    text_normed, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb)
    attn, text_attn = block.attn(hidden_states=normed, encoder_hidden_states=text_normed, attention_mask=None,
                                 image_rotary_emb=rotary)
    hidden = hidden + _gated(attn, first, gate_msa, tr_gate_msa)
    text = text + text_attn * c_gate_msa.unsqueeze(1)
    normed = _modulate(block.norm2(hidden), first, shift_mlp, scale_mlp, tr_shift_mlp, tr_scale_mlp)
    text_normed = block.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    hidden = hidden + _gated(block.ff(normed), first, gate_mlp, tr_gate_mlp)
    text = text + c_gate_mlp.unsqueeze(1) * block.ff_context(text_normed)
    return hidden, text


def single_block(block: torch.nn.Module, hidden: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                 replace: torch.Tensor, first: int,
                 rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``HunyuanVideoSingleTransformerBlock`` with the first ``first`` video tokens modulated by
    ``replace``; the text (after the video in the joint stream) keeps ``temb``."""
    text_len = text.shape[1]
    joint = torch.cat([hidden, text], dim=1)  # (B, N_local + L, hidden)
    norm = block.norm
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)  # 3 x (B, hidden)
    tr_shift, tr_scale, tr_gate = norm.linear(norm.silu(replace)).chunk(3, dim=1)
    normed = _modulate(norm.norm(joint), first, shift, scale, tr_shift, tr_scale)
    mlp = block.act_mlp(block.proj_mlp(normed))
    attn, text_attn = block.attn(hidden_states=normed[:, :-text_len], encoder_hidden_states=normed[:, -text_len:],
                                 attention_mask=None, image_rotary_emb=rotary)
    out = block.proj_out(torch.cat([torch.cat([attn, text_attn], dim=1), mlp], dim=2))
    joint = joint + _gated(out, first, gate, tr_gate)
    return joint[:, :-text_len], joint[:, -text_len:]


def final_norm(norm_out: torch.nn.Module, hidden: torch.Tensor, temb: torch.Tensor, replace: torch.Tensor,
               first: int) -> torch.Tensor:
    """diffusers' output ``AdaLayerNormContinuous`` with the first ``first`` tokens modulated by ``replace``, as
    ComfyUI's final layer (diffusers' own keeps ``temb`` there)."""
    return torch.cat([norm_out(hidden[:, :first], replace), norm_out(hidden[:, first:], temb)], dim=1)
