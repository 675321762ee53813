"""Predicted seconds of one generation for a layout on a cluster: per-rank compute from the model's FLOPs
and the device's rate, plus the communication the engine cannot hide, from the byte counts of
``traffic`` and the link each axis crosses. Modelled, never measured.

What it assumes, as the engine runs:
- every axis divides the compute evenly (Ulysses and Ring the tokens, CFG the branches, PipeFusion the
  blocks); a rank's rate falls with its token count (``Device.half_tokens``);
- Ulysses' all-to-alls, the output gathers and the CFG all-gather are not overlapped; Ring's K/V sends
  overlap the attention they feed; PipeFusion's sends are asynchronous and overlap the next patch;
- PipeFusion's warm-up calls are synchronous (stage after stage on the whole latent); after them the
  stages overlap on patches, and the pipeline fills once per generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..parallel_config import ParallelConfig
from .hardware import Cluster
from .model_shape import ModelShape
from .traffic import CallShape, branches_per_rank, forwards_per_rank, pipefusion_call_bytes, sequence_call_bytes


@dataclass(frozen=True)
class Prediction:
    """One layout's predicted time and where it goes."""

    layout: ParallelConfig
    seconds: float  # the whole generation
    compute: float  # seconds the slowest rank computes
    exposed: dict[str, float] = field(default_factory=dict)  # seconds of communication per axis left exposed

    def describe(self) -> str:
        comm = ", ".join(f"{axis} {seconds:.3f}" for axis, seconds in sorted(self.exposed.items()) if seconds > 0)
        return f"{self.layout.describe()}: {self.seconds:.2f} s (compute {self.compute:.2f} s" + \
            (f"; exposed comm {comm}" if comm else "") + ")"


def _strides(layout: ParallelConfig) -> dict[str, tuple[int, int]]:
    """axis -> (rank stride, degree) in the mesh order cfg x pipefusion x ring x ulysses (ulysses innermost)."""
    u, r, p = layout.ulysses_degree, layout.ring_degree, layout.pipefusion_degree
    return {"ulysses": (1, u), "ring": (u, r), "sequence": (1, u * r), "pipefusion": (u * r, p),
            "cfg": (u * r * p, layout.cfg_degree)}


class _Axes:
    """Seconds of each axis' traffic on the link its group crosses."""

    def __init__(self, layout: ParallelConfig, cluster: Cluster) -> None:
        self.links = {axis: cluster.link_for(stride, degree) for axis, (stride, degree) in _strides(layout).items()}

    def seconds(self, axis: str, nbytes: float, messages: int) -> float:
        return self.links[axis].seconds(nbytes, messages) if nbytes else 0.0


def _sequence_call(shape: ModelShape, layout: ParallelConfig, cluster: Cluster, call: CallShape,
                   axes: _Axes) -> tuple[float, dict[str, float]]:
    """(compute, exposed comm per axis) of one call of the sequence x CFG loop."""
    p, branches = layout.sequence_degree, branches_per_rank(layout, call)
    tokens = call.image_tokens / p
    compute = cluster.device.seconds(branches * call.batch * shape.forward_flops(call.image_tokens) / p, tokens)
    attention = cluster.device.seconds(branches * call.batch * shape.attention_flops(call.image_tokens) / p, tokens)
    sent = sequence_call_bytes(shape, layout, call)
    forwards = forwards_per_rank(layout, call)  # messages per collective: batched branches share them
    layers = shape.blocks * forwards
    ring = axes.seconds("ring", sent.get("ring", 0), (layout.ring_degree - 1) * layers)
    exposed = {"ulysses": axes.seconds("ulysses", sent.get("ulysses", 0), 4 * layers),
               "ring": max(0.0, ring - attention),
               "sequence": axes.seconds("sequence", sent.get("sequence", 0), forwards),
               "cfg": axes.seconds("cfg", sent.get("cfg", 0), 1)}
    return compute, exposed


def _pipefusion_calls(shape: ModelShape, layout: ParallelConfig, cluster: Cluster, call: CallShape,
                      axes: _Axes, warm: bool) -> tuple[float, float, dict[str, float]]:
    """(seconds of one call, of which compute, exposed comm per axis) for a warm-up or a patch call."""
    stages, p = layout.pipefusion_degree, layout.sequence_degree
    branches = branches_per_rank(layout, call)
    items = 1 if warm else layout.patches
    start, stop = max(shape.stages(stages), key=lambda s: sum(shape.stage_costs[s[0]:s[1]]))  # the slowest stage
    flops = sum(shape.block_flops(call.image_tokens, b) for b in range(start, stop))
    attention = shape.attention_flops(call.image_tokens) * (stop - start) / shape.blocks
    tokens = call.image_tokens / items / p
    item_compute = cluster.device.seconds(branches * flops / items / p, tokens)
    item_attention = cluster.device.seconds(branches * attention / items / p, tokens)
    first = pipefusion_call_bytes(shape, layout, call, 0, warm, sends_back=0)
    last = pipefusion_call_bytes(shape, layout, call, stages - 1, warm, sends_back=call.image_tokens // p)
    forwards = forwards_per_rank(layout, call)  # messages per collective: batched branches share them
    layers = (stop - start) * forwards
    ulysses = axes.seconds("ulysses", first.get("ulysses", 0) / items, 4 * layers)
    ring = max(0.0, axes.seconds("ring", first.get("ring", 0) / items, (layout.ring_degree - 1) * layers)
               - item_attention)
    send = axes.seconds("pipefusion", first["pipefusion"] / items, forwards)
    tail = axes.seconds("sequence", last.get("sequence", 0), items * forwards) + \
        axes.seconds("cfg", last.get("cfg", 0), 1)
    stage_item = item_compute + ulysses + ring
    if warm:  # stage after stage on the whole latent, each handing its activations on
        seconds = stages * stage_item + (stages - 1) * send + tail
        exposed = {"ulysses": stages * ulysses, "ring": stages * ring, "pipefusion": (stages - 1) * send}
        return seconds, stages * item_compute, {**exposed, "tail": tail}
    item = max(stage_item, send)  # sends overlap the next patch
    exposed = {"ulysses": items * ulysses, "ring": items * ring, "pipefusion": items * max(0.0, send - stage_item)}
    return items * item + tail, items * item_compute, {**exposed, "tail": tail}


def predict(shape: ModelShape, layout: ParallelConfig, cluster: Cluster, call: CallShape,
            calls: int) -> Prediction:
    """Seconds of ``calls`` model calls (one per step for single-call samplers) of ``layout``."""
    axes = _Axes(layout, cluster)
    exposed: dict[str, float] = {}

    def add(part: dict[str, float], times: float) -> None:
        for axis, seconds in part.items():
            exposed[axis] = exposed.get(axis, 0.0) + seconds * times

    if layout.pipefusion_degree == 1:
        compute, comm = _sequence_call(shape, layout, cluster, call, axes)
        add(comm, calls)
        return Prediction(layout, calls * (compute + sum(comm.values())), calls * compute, exposed)
    warm_calls = min(layout.warmup_steps, calls)
    warm, warm_compute, warm_comm = _pipefusion_calls(shape, layout, cluster, call, axes, warm=True)
    steady, steady_compute, steady_comm = _pipefusion_calls(shape, layout, cluster, call, axes, warm=False)
    patch_calls = calls - warm_calls
    fill = (layout.pipefusion_degree - 1) * steady / layout.patches if patch_calls else 0.0  # the pipeline fills once
    add(warm_comm, warm_calls)
    add(steady_comm, patch_calls)
    return Prediction(layout, warm_calls * warm + patch_calls * steady + fill,
                      warm_calls * warm_compute + patch_calls * steady_compute, exposed)
