"""An independent, plain Flux forward written from the BFL model description, straight on a BFL-layout
state dict: no diffusers, no renaming. Tests compare our adapter against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000, factor: float = 1000.0):
    t = t * factor
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp_embed(sd, name, x):
    return _linear(sd, f"{name}.out_layer", F.silu(_linear(sd, f"{name}.in_layer", x)))


def _rope(pos: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    omega = 1.0 / theta ** scale
    out = pos.double()[..., None] * omega  # (L, dim/2)
    rot = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rot.reshape(*out.shape, 2, 2).float()  # (L, dim/2, 2, 2)


def _apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # x: (B, H, L, D) -> pairs (B, H, L, D/2, 1, 2)
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _rms(x, scale):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * scale


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _split_heads(qkv, heads):
    b, length, _ = qkv.shape
    return qkv.reshape(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)


def _attention(q, k, v, pe):
    q, k = _apply_rope(q, pe), _apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
    return out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)


def flux_forward(sd: dict, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, y: torch.Tensor,
                 timesteps: torch.Tensor, guidance: torch.Tensor | None, heads: int, axes: tuple[int, ...]):
    """BFL Flux: img (B, N, 64), txt (B, L, ctx), y (B, pooled), timesteps = sigma (B,) -> (B, N, 64)."""
    vec = _mlp_embed(sd, "time_in", _timestep_embedding(timesteps))
    if "guidance_in.in_layer.weight" in sd:
        vec = vec + _mlp_embed(sd, "guidance_in", _timestep_embedding(guidance))
    vec = vec + _mlp_embed(sd, "vector_in", y)
    img = _linear(sd, "img_in", img)
    txt = _linear(sd, "txt_in", txt)
    ids = torch.cat([torch.zeros(txt.shape[1], 3), img_ids], dim=0)
    pe = torch.cat([_rope(ids[:, i], axes[i]) for i in range(3)], dim=-3)[None, None]  # (1, 1, L, D/2, 2, 2)
    n_txt = txt.shape[1]
    i = 0
    while f"double_blocks.{i}.img_mod.lin.weight" in sd:
        p = f"double_blocks.{i}"
        streams = {}
        for name, x in (("img", img), ("txt", txt)):
            mod = _linear(sd, f"{p}.{name}_mod.lin", F.silu(vec))[:, None, :].chunk(6, dim=-1)
            x_mod = (1 + mod[1]) * _ln(x) + mod[0]
            q, k, v = _split_heads(_linear(sd, f"{p}.{name}_attn.qkv", x_mod), heads)
            q = _rms(q, sd[f"{p}.{name}_attn.norm.query_norm.scale"])
            k = _rms(k, sd[f"{p}.{name}_attn.norm.key_norm.scale"])
            streams[name] = (mod, q, k, v)
        q = torch.cat([streams["txt"][1], streams["img"][1]], dim=2)
        k = torch.cat([streams["txt"][2], streams["img"][2]], dim=2)
        v = torch.cat([streams["txt"][3], streams["img"][3]], dim=2)
        attn = _attention(q, k, v, pe)
        outs = {"txt": attn[:, :n_txt], "img": attn[:, n_txt:]}
        new = {}
        for name, x in (("img", img), ("txt", txt)):
            mod = streams[name][0]
            x = x + mod[2] * _linear(sd, f"{p}.{name}_attn.proj", outs[name])
            h = _linear(sd, f"{p}.{name}_mlp.0", (1 + mod[4]) * _ln(x) + mod[3])
            x = x + mod[5] * _linear(sd, f"{p}.{name}_mlp.2", F.gelu(h, approximate="tanh"))
            new[name] = x
        img, txt = new["img"], new["txt"]
        i += 1
    x = torch.cat([txt, img], dim=1)
    hidden = x.shape[-1]
    i = 0
    while f"single_blocks.{i}.linear1.weight" in sd:
        p = f"single_blocks.{i}"
        shift, scale, gate = _linear(sd, f"{p}.modulation.lin", F.silu(vec))[:, None, :].chunk(3, dim=-1)
        x_mod = (1 + scale) * _ln(x) + shift
        qkv, mlp = torch.split(_linear(sd, f"{p}.linear1", x_mod), [3 * hidden, x_mod.shape[-1] * 4], dim=-1)
        q, k, v = _split_heads(qkv, heads)
        q = _rms(q, sd[f"{p}.norm.query_norm.scale"])
        k = _rms(k, sd[f"{p}.norm.key_norm.scale"])
        attn = _attention(q, k, v, pe)
        x = x + gate * _linear(sd, f"{p}.linear2", torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        i += 1
    img = x[:, n_txt:]
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=-1)
    img = (1 + scale[:, None]) * _ln(img) + shift[:, None]
    return _linear(sd, "final_layer.linear", img)
