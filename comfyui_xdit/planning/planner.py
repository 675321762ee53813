"""The layout planner: every (cfg, pipefusion, ring, ulysses, patches) a pool and a model allow, ranked
by the latency model. What it prints and logs is a prediction, labelled so."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

from ..parallel_config import ParallelConfig, divisors
from .hardware import Cluster
from .latency_model import Prediction, predict
from .model_shape import ModelShape
from .traffic import CallShape

logger = logging.getLogger(__name__)

PATCH_FACTORS = (1, 2, 4)  # PipeFusion patches tried: M = stages x these


@dataclass(frozen=True)
class PlanRequest:
    """What the plan is for: the model call's shape, how many calls, and which modes are allowed."""

    call: CallShape
    calls: int = 28
    exact: bool = False  # True: leave out PipeFusion (equal to serial only during its warm-up steps)
    warmup_steps: int = 1
    use_all_gpus: bool = False  # True: only layouts over every GPU of the pool


def layouts(shape: ModelShape, cluster: Cluster, plan: PlanRequest) -> Iterator[ParallelConfig]:
    """Every layout of at most ``cluster.gpus`` ranks that the engine accepts for this model and size."""
    worlds = [cluster.gpus] if plan.use_all_gpus else range(1, cluster.gpus + 1)
    cfg_scale = 1.0 if plan.call.cfg_branches == 1 else 2.0
    for world in worlds:
        for cfg in (1, 2) if plan.call.cfg_branches == 2 else (1,):
            if world % cfg:
                continue
            for stages in divisors(world // cfg) if not plan.exact else (1,):
                rest = world // cfg // stages
                for ulysses in divisors(rest):
                    for factor in PATCH_FACTORS if stages > 1 else (None,):
                        layout = ParallelConfig(cfg_degree=cfg, pipefusion_degree=stages, ring_degree=rest // ulysses,
                                                ulysses_degree=ulysses,
                                                num_patches=None if factor is None else stages * factor,
                                                warmup_steps=plan.warmup_steps if stages > 1 else 1)
                        try:
                            layout.validate_for(world, shape.heads, plan.call.image_tokens, cfg_scale,
                                                num_blocks=shape.blocks, batch_size=plan.call.batch)
                        except ValueError:
                            continue
                        yield layout


def plan_layouts(shape: ModelShape, cluster: Cluster, plan: PlanRequest) -> list[Prediction]:
    """Every allowed layout's prediction, fastest first; ``ValueError`` when none fits."""
    ranked = sorted((predict(shape, layout, cluster, plan.call, plan.calls) for layout in layouts(shape, cluster, plan)),
                    key=lambda p: (p.seconds, p.layout.world_size))
    if not ranked:
        raise ValueError(f"no layout of {cluster.gpus} GPUs fits {shape.name} at {plan.call.image_tokens} image tokens "
                         f"({shape.heads} heads, {shape.blocks} blocks); choose a width and height whose token count "
                         f"divides by the GPU count")
    return ranked


def best_layout(shape: ModelShape, cluster: Cluster, plan: PlanRequest) -> Prediction:
    """The fastest layout (over every GPU when ``use_all_gpus``), logged with its prediction."""
    best = plan_layouts(shape, cluster, plan)[0]
    logger.info("planned %s for %s on %d x %d %s (modelled): %s", best.layout.describe(), shape.name, cluster.hosts,
                cluster.gpus_per_host, cluster.device.name, best.describe())
    return best
