"""Bytes one rank sends in one model call, per parallel axis: the closed forms the engine's
``CommCounter`` is tested against (``tests/test_planning.py``), for any model shape and layout.

Activations travel in the model's dtype (``activation_bytes``); model outputs, latents and the stop vote
in float32, as the engine sends them. HunyuanDiT's long skips crossing a PipeFusion boundary and SD3.5's
image-only second attention are not counted (a few per cent of those families' traffic).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..parallel_config import ParallelConfig
from .model_shape import ModelShape

FP32 = 4


@dataclass(frozen=True)
class CallShape:
    """One model call: how many image tokens, images and CFG branches, and the activations' dtype size."""

    image_tokens: int
    batch: int = 1
    cfg_branches: int = 2  # 2: true CFG (a negative is run), 1: cfg == 1.0 or a distilled model
    activation_bytes: int = 2  # bf16 / fp16; 4 for float32
    batch_cfg: bool = True  # both branches of a rank in one forward of batch 2B (the engine's default)


def branches_per_rank(layout: ParallelConfig, call: CallShape) -> int:
    """CFG branches one rank computes per model call: its own under CFG parallel, else every branch."""
    return 1 if layout.cfg_degree == 2 else call.cfg_branches


def forwards_per_rank(layout: ParallelConfig, call: CallShape) -> int:
    """Forwards (so messages per collective) one rank runs per model call: its branches batched into one, or
    one per branch. The bytes are those of its branches either way (one message of 2B rows or two of B)."""
    return 1 if call.batch_cfg else branches_per_rank(layout, call)


def attention_bytes(shape: ModelShape, layout: ParallelConfig, call: CallShape, local: int,
                    with_text: bool = True) -> dict[str, int]:
    """One attention layer of one forward on ``local`` image tokens per rank: Ulysses' four all-to-alls
    (keeping 1/u) and its all-gather of the text's output over heads (not for a PipeFusion item without the
    prompt, ``with_text=False``); Ring's image K/V passed r - 1 times."""
    u, r = layout.ulysses_degree, layout.ring_degree
    act, b, heads, head_dim = call.activation_bytes, call.batch, shape.heads, shape.head_dim
    out: dict[str, int] = {}
    if u > 1:
        all_to_all = 4 * b * local * heads * head_dim * act * (u - 1) // u
        joint = shape.joint_text and with_text
        text = (u - 1) * b * shape.text_tokens * (heads // u) * head_dim * act if joint else 0
        out["ulysses"] = all_to_all + text
    if r > 1:  # after Ulysses a rank holds u shards with heads / u heads each
        out["ring"] = (r - 1) * 2 * b * local * u * (heads // u) * head_dim * act
    return out


def _add(total: dict[str, int], part: dict[str, int], times: int) -> None:
    for axis, nbytes in part.items():
        total[axis] = total.get(axis, 0) + nbytes * times


def sequence_call_bytes(shape: ModelShape, layout: ParallelConfig, call: CallShape) -> dict[str, int]:
    """A rank of the sequence x CFG parallel loop (no PipeFusion), per model call."""
    p, b, channels = layout.sequence_degree, call.batch, shape.token_channels
    local = call.image_tokens // p
    branches = branches_per_rank(layout, call)
    out = {"control": FP32}  # the stop vote
    _add(out, attention_bytes(shape, layout, call, local), shape.blocks * branches)
    if p > 1:  # the model output's shard all-gathered over ring x ulysses
        out["sequence"] = branches * (p - 1) * b * local * channels * FP32
    if layout.cfg_degree == 2:  # one latent per call
        out["cfg"] = b * call.image_tokens * channels * FP32
    return out


def pipefusion_call_bytes(shape: ModelShape, layout: ParallelConfig, call: CallShape, stage: int, warm: bool,
                          sends_back: int, preview_bytes: int = 0) -> dict[str, int]:
    """A rank of PipeFusion stage ``stage`` in one model call (batch 1): a warm-up call runs the whole latent
    as one item, a patch call ``patches`` items. ``sends_back``: latent tokens the last stage returns to
    stage 0 in this call (0 in the final one); ``preview_bytes``: the preview it sends with them."""
    p, channels, act = layout.sequence_degree, shape.token_channels, call.activation_bytes
    items = 1 if warm else layout.patches
    local = call.image_tokens // items // p
    branches = branches_per_rank(layout, call)
    start, stop = shape.stages(layout.pipefusion_degree)[stage]
    out = {"control": FP32 * items}  # the stop vote, one per work item
    texts = 1 if shape.text_once else items  # items that carry the prompt (``pipefusion_text.py``)
    layers = (stop - start) * branches
    _add(out, attention_bytes(shape, layout, call, local), texts * layers)
    _add(out, attention_bytes(shape, layout, call, local, with_text=False), (items - texts) * layers)
    if stage < layout.pipefusion_degree - 1:  # image shard per item per branch, + the text stream of those with it
        out["pipefusion"] = branches * shape.hidden * act * (items * local + texts * shape.text_tokens)
        return out
    if p > 1:
        out["sequence"] = items * branches * (p - 1) * local * channels * FP32
    if layout.cfg_degree == 2:
        out["cfg"] = call.image_tokens * channels * FP32
    if sends_back or preview_bytes:
        out["pipefusion"] = sends_back * channels * FP32 + preview_bytes
    return out
