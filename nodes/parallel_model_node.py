"""xDiT Parallelize Model: ComfyUI's own MODEL (with its LoRAs and model sampling) -> XDIT_MODEL."""

from __future__ import annotations

import logging
from dataclasses import replace

from comfy_api.latest import io

from comfyui_xdit.environment import require_environment
from comfyui_xdit.lora import patches_digest
from comfyui_xdit.models.families import family_of, infer_spec
from comfyui_xdit.models.fp8_weights import weight_dtype_of_state
from comfyui_xdit.request import IN_MEMORY_PREFIX, ModelRef

from .comfy_types import CATEGORY, XDiTModelType, XDiTPoolType
from .handles import ModelHandle, PoolHandle
from .model_patches import base_weights, check_family, lora_patches, sigma_shift
from .pool_access import registry
from .validation import MAX_DEGREE, WEIGHT_DTYPES, auto_config, layout_inputs, parallel_config, resolve_dtype

logger = logging.getLogger(__name__)


def model_identity(model) -> str:
    """Names the MODEL's base weights (shared by its LoRA-patched clones) for this ComfyUI process."""
    return f"{IN_MEMORY_PREFIX}{id(model.model):x}"


class XDiTParallelModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        degree = dict(default=1, min=1, max=MAX_DEGREE)
        return io.Schema(
            node_id="XDiTParallelModel",
            display_name="xDiT Parallelize Model",
            category=CATEGORY,
            description="Takes ComfyUI's MODEL of a family we run (UNETLoader/CheckpointLoaderSimple -> LoRA loaders -> the family's ModelSampling node) to the pool: "
                        "the base weights go once, LoRAs are merged on the ranks, the model sampling is kept.",
            inputs=[
                XDiTPoolType.Input("pool"),
                io.Model.Input("model"),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="default",
                               tooltip="Compute dtype on the ranks; default = bf16 on GPUs, fp32 on CPU."),
                io.Int.Input("ulysses_degree", **degree),
                io.Int.Input("ring_degree", **degree),
                io.Int.Input("pipefusion_degree", **degree),
                io.Int.Input("num_patches", default=0, min=0, max=256),
                io.Int.Input("warmup_steps", default=1, min=0, max=10000),
                io.Boolean.Input("cfg_parallel", default=False),
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
            ],
            outputs=[XDiTModelType.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, pool: PoolHandle, model, weight_dtype: str, ulysses_degree: int, ring_degree: int,
                pipefusion_degree: int, num_patches: int, warmup_steps: int, cfg_parallel: bool,
                data_degree: int = 1, layout: str = "manual", plan_width: int = 1024,
                plan_height: int = 1024, shard_weights: bool = False) -> io.NodeOutput:
        require_environment()
        family = check_family(model)
        if layout == "manual":
            config = parallel_config(ulysses_degree, ring_degree, pipefusion_degree, num_patches, warmup_steps,
                                     cfg_parallel, data_degree)
        state = base_weights(model)
        spec = infer_spec(state, "the MODEL")
        if spec.family != family:
            raise ValueError(f"the MODEL is ComfyUI's {family} but its weights read as {spec.family}; load the file "
                             f"with UNETLoader or CheckpointLoaderSimple")
        patches = lora_patches(model)
        unknown = sorted({p.key for p in patches} - set(state))
        if unknown:
            raise ValueError(f"a LoRA patches {unknown[0]!r}, which this {family_of(spec).title} model does not have; the LoRA was "
                             f"made for another model")
        digest = patches_digest(patches)
        # a MODEL whose weights ComfyUI holds in fp8 (UNETLoader's fp8 weight_dtype) stays fp8 on the ranks
        ref = ModelRef(path=model_identity(model), dtype=resolve_dtype(weight_dtype, pool), patches=digest,
                       weight_dtype=weight_dtype_of_state(state))
        live = registry().get(pool)
        if layout != "manual":
            config = auto_config(spec, live.status().hosts, layout, plan_width, plan_height, cfg_parallel,
                                 warmup_steps, data_degree, inter=live.inter_host_link())
        config = replace(config, shard_weights=bool(shard_weights))  # ValueError naming the fix on one rank per stage
        live.hold_model(ref.path, state, digest, patches)
        live.warm(config)  # the sampler checks the layout against the model and the latent before running
        logger.info("xDiT model from the MODEL (%d LoRA patches %s, weights %s) on %s, %s", len(patches),
                    digest or "-", ref.weight_dtype, pool.describe(), config.describe())
        return io.NodeOutput(ModelHandle(pool=pool, model=ref, parallel=config, spec=spec, name="MODEL",
                                         shift=sigma_shift(model)))
