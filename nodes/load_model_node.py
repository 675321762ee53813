"""xDiT Load Diffusion Model: a file from models/diffusion_models and how to spread it -> XDIT_MODEL."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import folder_paths
from comfy_api.latest import io

from comfyui_xdit.environment import require_environment

from comfyui_xdit.models.families import read_spec
from comfyui_xdit.models.fp8_weights import UNET_LOADER_CHOICES, weight_dtype_of_choice
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import ModelRef

from .comfy_types import CATEGORY, XDiTModelType, XDiTPoolType
from .handles import ModelHandle, PoolHandle
from .pool_access import registry
from .validation import (MAX_DEGREE, WEIGHT_DTYPES, auto_config, check_config, layout_inputs, parallel_config,
                         resolve_dtype)

logger = logging.getLogger(__name__)


def sharding_problem(config: ParallelConfig) -> Optional[str]:
    """None when ``config`` can shard weights (more than one rank per PipeFusion stage), else the fix."""
    try:
        config.check_shardable()
    except ValueError as exc:
        return str(exc)
    return None


class XDiTLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        degree = dict(default=1, min=1, max=MAX_DEGREE)
        return io.Schema(
            node_id="XDiTLoadModel",
            display_name="xDiT Load Diffusion Model",
            category=CATEGORY,
            description="Loads a diffusion transformer (Flux, SD3/SD3.5, Qwen-Image, PixArt, HunyuanDiT, Wan 2.1 T2V, CogVideoX 1.0 / 1.5 T2V and I2V as diffusers' transformer file; detected from the file) once onto every rank of the pool. The product of the "
                        "degrees (x2 with cfg_parallel, x data_degree) is the number of GPUs used.",
            inputs=[
                XDiTPoolType.Input("pool"),
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models")),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="default",
                               tooltip="Compute dtype on the ranks; default = bf16 on GPUs, fp32 on CPU."),
                io.Int.Input("ulysses_degree", **degree, tooltip="Ulysses sequence parallel (all-to-all every "
                             "layer; keep on GPUs of one host). Must divide the attention heads (Flux 24, SD3.5 large 38, SD3 medium 24)."),
                io.Int.Input("ring_degree", **degree, tooltip="Ring attention sequence parallel."),
                io.Int.Input("pipefusion_degree", **degree, tooltip="PipeFusion stages (blocks split over GPUs; "
                             "may cross hosts)."),
                io.Int.Input("num_patches", default=0, min=0, max=256, tooltip="PipeFusion patches M "
                             "(0 = one per stage; at least pipefusion_degree)."),
                io.Int.Input("warmup_steps", default=1, min=0, max=10000, tooltip="Synchronous full steps "
                             "before PipeFusion reuses one-step-stale activations."),
                io.Boolean.Input("cfg_parallel", default=False, tooltip="Run the positive and negative CFG "
                                 "branches on two rank groups (needs cfg != 1)."),
                # optional, and last: saved workflows and API prompts without it keep working (default 1)
                io.Int.Input("data_degree", **degree, optional=True, tooltip="Batch groups: the images of a batch "
                             "split over this many rank groups, each with the degrees above (needs batch_size >= "
                             "this)."),
                *layout_inputs(),
                # optional, and last: saved workflows keep loading (default off)
                io.Boolean.Input("shard_weights", default=False, optional=True,
                                 tooltip="Keep 1/N of every transformer block's weights on each of the N GPUs of a "
                                         "PipeFusion stage (FSDP2), gathering a block just before it runs: less "
                                         "memory per GPU for one all-gather of its weights per block. Needs more "
                                         "than one GPU per stage."),
                # optional, and last: older workflows load with "default"
                io.Combo.Input("weight_storage", options=list(UNET_LOADER_CHOICES), default="default", optional=True,
                               tooltip="How the ranks store the weights, as UNETLoader's weight_dtype: default keeps "
                                       "an fp8 file's Linear weights fp8; fp8_e4m3fn / fp8_e5m2 round every weight to "
                                       "fp8 and keep the Linear weights fp8 (1 byte each), upcast to the compute "
                                       "dtype layer by layer. fp8_e4m3fn_fast computes as fp8_e4m3fn (no fp8 matmul)."),
            ],
            outputs=[XDiTModelType.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, unet_name: str, ulysses_degree: int, ring_degree: int, pipefusion_degree: int,
                        num_patches: int, warmup_steps: int, cfg_parallel: bool, data_degree: int = 1,
                        layout: str = "manual", plan_width: int = 1024, plan_height: int = 1024,
                        shard_weights: bool = False, weight_storage: str = "default") -> bool | str:
        if layout != "manual":  # the planner picks the degrees when the node runs (it needs the pool)
            ulysses_degree = ring_degree = pipefusion_degree = 1
            num_patches = 0
        problem = check_config(folder_paths.get_full_path("diffusion_models", unet_name), unet_name,
                               ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                               pipefusion_degree=pipefusion_degree, num_patches=num_patches,
                               warmup_steps=warmup_steps, cfg_parallel=cfg_parallel, data_degree=data_degree)
        if problem is None and shard_weights and layout == "manual":  # the planned layout is checked when it runs
            problem = sharding_problem(parallel_config(ulysses_degree, ring_degree, pipefusion_degree, num_patches,
                                                       warmup_steps, cfg_parallel, data_degree))
        return problem or True

    @classmethod
    def execute(cls, pool: PoolHandle, unet_name: str, weight_dtype: str, ulysses_degree: int, ring_degree: int,
                pipefusion_degree: int, num_patches: int, warmup_steps: int, cfg_parallel: bool,
                data_degree: int = 1, layout: str = "manual", plan_width: int = 1024,
                plan_height: int = 1024, shard_weights: bool = False,
                weight_storage: str = "default") -> io.NodeOutput:
        require_environment()
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        spec = read_spec(path)  # ValueError naming what the file holds when it is no family we run
        ref = ModelRef(path=path, dtype=resolve_dtype(weight_dtype, pool),
                       weight_dtype=weight_dtype_of_choice(weight_storage))
        live = registry().get(pool)
        if layout == "manual":
            config = parallel_config(ulysses_degree, ring_degree, pipefusion_degree, num_patches, warmup_steps,
                                     cfg_parallel, data_degree)
        else:
            config = auto_config(spec, live.status().hosts, layout, plan_width, plan_height, cfg_parallel,
                                 warmup_steps, data_degree, inter=live.inter_host_link())
        config = replace(config, shard_weights=bool(shard_weights))  # ValueError naming the fix on one rank per stage
        live.warm(config)  # build the ranks now, so a shortage of devices shows on this node
        logger.info("xDiT model %s (%s) on %s", unet_name, config.describe(), pool.describe())
        return io.NodeOutput(ModelHandle(pool=pool, model=ref, parallel=config, spec=spec, name=unet_name))
