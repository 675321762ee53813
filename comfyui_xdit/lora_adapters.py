"""The weight-patch records a rank merges, one frozen dataclass per kind of ComfyUI adapter it accepts.

Each record holds plain CPU tensors and numbers (it is pickled into Ray's object store) and knows its
low-rank change to one BFL weight: ``change(shape)`` is ComfyUI v0.3.64's ``lora_diff`` of that adapter
(``comfy/weight_adapter/{lora,loha,lokr}.py``), computed in float32 with the same operations, and the
alpha scale. Strengths, slices and DoRA are applied the same way for every kind by ``comfyui_xdit.lora``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


def _f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32)


def _tucker(t: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A CP/Tucker-decomposed kernel as LyCORIS stores it and ComfyUI expands it."""
    # t (rank, rank, kh, kw), b (rank, in), a (rank, out) -> (out, in, kh, kw)
    return torch.einsum("i j k l, j r, i p -> p r k l", _f32(t), _f32(b), _f32(a))


@dataclass(frozen=True)
class LoraPatch:
    """A LoRA (or LoCon, or DoRA) change to one BFL weight:
    ``weight[offset] += strength * alpha/rank * up @ (down, through mid when LoCon has one)``."""

    key: str  # BFL tensor name, e.g. "double_blocks.0.img_attn.qkv.weight"
    up: torch.Tensor  # (out, rank) or a conv's (out, rank, 1, 1)
    down: torch.Tensor  # (rank, in) or a conv's (rank, in, kh, kw); (rank, in, 1, 1) with mid
    alpha: Optional[float]  # None: scale 1
    strength: float
    strength_model: float = 1.0
    offset: Optional[tuple[int, int, int]] = None  # (dim, start, length) of the fused weight
    mid: Optional[torch.Tensor] = None  # LoCon's Tucker core (rank, rank, kh, kw), or None
    dora_scale: Optional[torch.Tensor] = None  # DoRA magnitudes (out, 1) or (1, in), or None
    swap_scale_shift: bool = False  # a diffusers norm_out LoRA: the change's two halves swapped (ComfyUI's function)

    def change(self, shape: torch.Size) -> tuple[torch.Tensor, float]:
        """The float32 change before strength and alpha, shaped as the target ``shape``, and alpha's scale."""
        up, down = _f32(self.up), _f32(self.down)
        alpha = self.alpha / down.shape[0] if self.alpha is not None else 1.0
        if self.mid is not None:
            mid = _f32(self.mid)
            final_shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            # (in, rank) x (rank, rank*kh*kw) -> (in, rank*kh*kw) -> (in, rank, kh, kw) -> (rank, in, kh, kw)
            down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                            mid.transpose(0, 1).flatten(start_dim=1)).reshape(final_shape).transpose(0, 1)
        # (out, rank) x (rank, in*kh*kw) -> the weight's (out, in[, kh, kw])
        return torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(shape), alpha


@dataclass(frozen=True)
class LohaPatch:
    """A LoHa change to one BFL weight: the Hadamard product of two low-rank products,
    ``weight[offset] += strength * alpha/rank * (w1_a @ w1_b) * (w2_a @ w2_b)``."""

    key: str
    w1_a: torch.Tensor  # (out, rank); (rank, out) with t1
    w1_b: torch.Tensor  # (rank, in)
    w2_a: torch.Tensor  # (out, rank); (rank, out) with t2
    w2_b: torch.Tensor  # (rank, in)
    alpha: Optional[float]  # None: scale 1; else divided by w1_b's rank
    strength: float
    strength_model: float = 1.0
    offset: Optional[tuple[int, int, int]] = None
    t1: Optional[torch.Tensor] = None  # Tucker cores (rank, rank, kh, kw) of a conv LoHa, or None
    t2: Optional[torch.Tensor] = None
    dora_scale: Optional[torch.Tensor] = None
    swap_scale_shift: bool = False  # a diffusers norm_out LoRA: the change's two halves swapped (ComfyUI's function)

    def change(self, shape: torch.Size) -> tuple[torch.Tensor, float]:
        """The float32 change before strength and alpha, shaped as the target ``shape``, and alpha's scale."""
        alpha = self.alpha / self.w1_b.shape[0] if self.alpha is not None else 1.0
        if self.t1 is not None:
            m1, m2 = _tucker(self.t1, self.w1_b, self.w1_a), _tucker(self.t2, self.w2_b, self.w2_a)
        else:
            # (out, rank) x (rank, in) -> (out, in), twice
            m1 = torch.mm(_f32(self.w1_a), _f32(self.w1_b))
            m2 = torch.mm(_f32(self.w2_a), _f32(self.w2_b))
        return (m1 * m2).reshape(shape), alpha


@dataclass(frozen=True)
class LokrPatch:
    """A LoKr change to one BFL weight: ``weight[offset] += strength * scale * kron(w1, w2)``, each factor
    stored whole or as a low-rank pair; ``scale`` is alpha over the rank of the last low-rank factor, or 1
    when both are whole (ComfyUI ignores alpha then). No Tucker core: ComfyUI v0.3.64 cannot merge one
    (``torch.kron`` refuses its einsum's strided result), so ``nodes/model_patches.py`` refuses it."""

    key: str
    w1: Optional[torch.Tensor]  # (a, b), or None for w1_a @ w1_b
    w2: Optional[torch.Tensor]  # (c, d) or a conv's (c, d, kh, kw), or None for w2_a @ w2_b
    w1_a: Optional[torch.Tensor]  # (a, rank)
    w1_b: Optional[torch.Tensor]  # (rank, b)
    w2_a: Optional[torch.Tensor]  # (c, rank)
    w2_b: Optional[torch.Tensor]  # (rank, d)
    alpha: Optional[float]
    strength: float
    strength_model: float = 1.0
    offset: Optional[tuple[int, int, int]] = None
    dora_scale: Optional[torch.Tensor] = None
    swap_scale_shift: bool = False  # a diffusers norm_out LoRA: the change's two halves swapped (ComfyUI's function)

    def change(self, shape: torch.Size) -> tuple[torch.Tensor, float]:
        """The float32 change before strength and alpha, shaped as the target ``shape``, and alpha's scale."""
        rank = None
        if self.w1 is None:
            rank = self.w1_b.shape[0]
            w1 = torch.mm(_f32(self.w1_a), _f32(self.w1_b))  # (a, rank) x (rank, b) -> (a, b)
        else:
            w1 = _f32(self.w1)
        if self.w2 is None:
            rank = self.w2_b.shape[0]
            w2 = torch.mm(_f32(self.w2_a), _f32(self.w2_b))  # (c, rank) x (rank, d) -> (c, d)
        else:
            w2 = _f32(self.w2)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)  # (a, b) -> (a, b, 1, 1) beside a conv's kernel
        alpha = self.alpha / rank if self.alpha is not None and rank is not None else 1.0
        # kron((a, b[, 1, 1]), (c, d[, kh, kw])) -> (a*c, b*d[, kh, kw]), the weight's shape
        return torch.kron(w1, w2).reshape(shape), alpha


WeightPatch = Union[LoraPatch, LohaPatch, LokrPatch]
