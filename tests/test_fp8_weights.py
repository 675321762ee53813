"""fp8 weights (models/fp8_weights.py): Linear weights resident in fp8, upcast to the compute dtype per layer.

Measured (2026-12-02, CPU, fp32 compute; tiny random models, 3 steps, cfg 2, euler):
- against the same model whose every tensor was rounded to fp8 and upcast to fp32: exactly equal (0.0)
  for all six families, in both fp8 dtypes (fp8 values are exact in fp32, and the per-layer upcast feeds
  the same kernels the same numbers);
- against the fp32 model: relative error 0.029 .. 0.083 (fp8_e4m3fn) and 0.060 .. 0.161 (fp8_e5m2), the
  rounding itself; asserted within (1e-3, 0.25);
- against stock ComfyUI's fp8 loading of the same file (UNETLoader's weight_dtype fp8_e4m3fn / fp8_e5m2,
  compute in fp32 on CPU; tiny SD3, 4 steps, cfg 2.5): 4.7e-7 / 4.6e-7, the same as the fp32 parity
  (5.3e-7); asserted 1e-5. Stock fp8 is itself 0.081 / 0.161 from stock fp32: we round what it rounds.
- a LoRA on fp8 weights: merged in float32 and stored back to fp8 with ComfyUI's seeded stochastic
  rounding, bit for bit ComfyUI's ModelPatcher's weight.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.lora import LoraPatch, merge_lora
from comfyui_xdit.model_loader import load_model, tiny_conditioning, tiny_spec, tiny_state
from comfyui_xdit.models.absent_block import AbsentBlock
from comfyui_xdit.models.checkpoint_file import read_checkpoint
from comfyui_xdit.models.families import build_adapter, read_spec, write_random_model
from comfyui_xdit.models.fp8_weights import (UpcastLinear, resident_bytes, stochastic_round, stored_state,
                                             weight_dtype_of_choice, weight_dtype_of_state)
from comfyui_xdit.models.sd3_checkpoint import TINY_SD3
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef

from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from nodes_package import nodes_module

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# tiny model -> an empty latent it samples (PixArt needs a mean side of 264 px)
LATENTS = {"flux": (1, 16, 16, 16), "sd3": (1, 16, 16, 16), "qwen-image": (1, 16, 16, 16),
           "pixart-sigma-narrow": (1, 4, 34, 34), "hunyuan-dit-narrow": (1, 4, 16, 16), "wan21": (1, 16, 2, 16, 16)}
FP32_BOUND = 0.25  # measured at most 0.161 (e5m2); see the module docstring
COMFY_BOUND = 1e-5  # measured 4.7e-7
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _stop_helpers():
    yield
    stop_helper_processes()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tiny_request(name: str, weight_dtype: str = "default", dtype: str = "fp32",
                 parallel: ParallelConfig = ParallelConfig()) -> GenerationRequest:
    model = ModelRef(f"tiny:{name}", dtype, weight_dtype=weight_dtype)
    positive, negative = tiny_conditioning(model, 0)
    return GenerationRequest(model, torch.zeros(*LATENTS[name]), positive, negative, seed=3, steps=STEPS, cfg=2.0,
                             parallel=parallel)


def rounded_then_upcast(state: dict[str, torch.Tensor], fp8: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(fp8).float() if v.is_floating_point() else v for k, v in state.items()}


# ---- the reference and the choices ---------------------------------------------------------------

def test_weight_dtype_is_part_of_the_model_identity() -> None:
    plain, fp8 = ModelRef("tiny:flux"), ModelRef("tiny:flux", weight_dtype="fp8_e4m3fn")
    assert plain.identity != fp8.identity and plain != fp8 and hash(plain) != hash(fp8)
    assert fp8.identity == ("tiny:flux", "fp32", "", "fp8_e4m3fn")
    with pytest.raises(ValueError, match="weight_dtype must be one of default, fp8_e4m3fn, fp8_e5m2"):
        ModelRef("tiny:flux", weight_dtype="fp8_e4m3fn_fast")  # the node / CLI map it first


def test_a_rank_caches_each_weight_dtype_as_its_own_model() -> None:
    from comfyui_xdit_workers.actor import RankSetup, RankWorker
    from comfyui_xdit_workers.weights import WeightSource

    worker = RankWorker(models_per_rank=2)
    worker.setup_info, worker.device = RankSetup(0, 1, "cpu"), torch.device("cpu")
    plain, fp8 = ModelRef("tiny:sd3"), ModelRef("tiny:sd3", weight_dtype="fp8_e5m2")
    for ref in (plain, fp8, plain, fp8):
        worker.load(WeightSource(ref), ParallelConfig())
        expected = torch.float8_e5m2 if ref is fp8 else torch.float32
        assert worker.adapter.blocks[0].attn.to_q.weight.dtype == expected
    assert worker.loads == 2  # built once each, then switched between


def test_unet_loader_choices() -> None:
    assert [weight_dtype_of_choice(c) for c in ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")] == \
        ["default", "fp8_e4m3fn", "fp8_e4m3fn", "fp8_e5m2"]
    with pytest.raises(ValueError, match="weight_dtype must be one of default, fp8_e4m3fn, fp8_e4m3fn_fast"):
        weight_dtype_of_choice("int8")
    state = {"a.weight": torch.zeros(8, 8, dtype=torch.float8_e5m2), "a.bias": torch.zeros(8)}
    assert weight_dtype_of_state(state) == "fp8_e5m2"
    assert weight_dtype_of_state({"a.weight": torch.zeros(8, 8, dtype=torch.bfloat16)}) == "default"


# ---- what is resident ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LATENTS))
def test_block_linear_weights_are_one_byte_a_parameter(name: str) -> None:
    adapter = load_model(ModelRef(f"tiny:{name}", weight_dtype="fp8_e4m3fn"))
    linears = [m for block in adapter.blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, UpcastLinear) for m in linears)
    assert sum(m.weight.numel() * m.weight.element_size() for m in linears) == sum(m.weight.numel() for m in linears)
    assert all(m.bias is None or m.bias.dtype == torch.float32 for m in linears)  # biases in the compute dtype
    assert adapter.dtype == torch.float32  # what the adapter computes in, even with an fp8 anchor weight
    by_dtype = resident_bytes(adapter.transformer)
    full = load_model(ModelRef(f"tiny:{name}")).parameter_bytes()
    fp8_share = by_dtype[torch.float8_e4m3fn] / sum(by_dtype.values())
    print(f"{name}: resident {sum(by_dtype.values())} bytes of {full} in fp32; fp8 share {fp8_share:.3f}")
    assert adapter.parameter_bytes() == sum(by_dtype.values()) < 0.4 * full


def test_a_pipefusion_stage_keeps_its_blocks_fp8() -> None:
    adapter = load_model(ModelRef("tiny:flux", weight_dtype="fp8_e5m2"), blocks=(1, 3))
    present = [b for b in adapter.blocks if not isinstance(b, AbsentBlock)]
    assert len(present) == 2 and isinstance(adapter.blocks[0], AbsentBlock)
    assert all(m.weight.dtype == torch.float8_e5m2 for b in present for m in b.modules()
               if isinstance(m, torch.nn.Linear))


# ---- what it computes ------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_dtype", sorted(FP8))
@pytest.mark.parametrize("name", sorted(LATENTS))
def test_fp8_equals_the_model_rounded_then_upcast(name: str, weight_dtype: str) -> None:
    request = tiny_request(name, weight_dtype)
    ours = Engine(load_model(request.model)).generate(request)
    rounded = build_adapter(rounded_then_upcast(tiny_state(name), FP8[weight_dtype]), tiny_spec(name),
                            torch.float32, "cpu", "rounded")
    assert torch.equal(ours, Engine(rounded).generate(request))
    error = relative_error(ours, Engine(load_model(ModelRef(f"tiny:{name}"))).generate(request))
    print(f"{name} {weight_dtype}: relative error against fp32 {error:.3f}")
    assert 1e-3 < error < FP32_BOUND


def test_default_keeps_an_fp8_files_weights_fp8(tmp_path) -> None:
    path = tmp_path / "sd3-fp8.safetensors"
    state = stored_state(tiny_state("sd3"), "fp8_e4m3fn")
    save_file(state, str(path))
    default = load_model(ModelRef(str(path)))
    assert default.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    request = dataclasses.replace(tiny_request("sd3"), model=ModelRef(str(path)))
    explicit = dataclasses.replace(request, model=ModelRef(str(path), weight_dtype="fp8_e4m3fn"))
    ours = Engine(default).generate(request)
    assert torch.equal(ours, Engine(load_model(explicit.model)).generate(explicit))
    half = dataclasses.replace(request, model=ModelRef(str(path), "bf16"))
    adapter = load_model(half.model)
    assert adapter.dtype == torch.bfloat16 and adapter.blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert relative_error(Engine(adapter).generate(half), ours) < 5e-2  # fp8 weights computed in bf16


def test_a_scaled_fp8_file_is_refused(tmp_path) -> None:
    path = tmp_path / "scaled.safetensors"
    state = stored_state(tiny_state("sd3"), "fp8_e4m3fn")
    state.update({"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
                  "joint_blocks.0.x_block.attn.qkv.scale_weight": torch.ones(())})
    save_file(state, str(path))
    with pytest.raises(ValueError, match="scaled fp8 weights .* use the plain fp8 or the bf16 release"):
        read_spec(path)


def test_fp8_state_survives_the_object_stores_pickling() -> None:
    """torch 2.14 cannot unpickle an fp8 tensor; the pool ships fp8 tensors as bytes, and a PipeFusion split
    reads the shipped state's shapes as it reads a file's."""
    import pickle

    from comfyui_xdit.models.families import infer_spec, stage_state
    from comfyui_xdit.models.fp8_weights import picklable, unpickled

    state = stored_state(tiny_state("flux"), "fp8_e5m2")
    shipped = picklable(state)
    assert infer_spec(shipped) == tiny_spec("flux")
    back = unpickled(pickle.loads(pickle.dumps(stage_state(shipped, tiny_spec("flux"), (0, 2)))))
    assert back and all(back[k].dtype == torch.float8_e5m2 and torch.equal(back[k].view(torch.uint8),
                                                                             state[k].view(torch.uint8)) for k in back)


# ---- parallel: the same numbers on gloo ranks --------------------------------------------------------

PARALLEL = {"ulysses2": ParallelConfig(ulysses_degree=2),
            "pipefusion2": ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS),
            # FSDP2 (parallel/weight_sharding.py) gathers the fp8 weights as fp8 (mixed dtypes: as bytes)
            "ulysses2-sharded": ParallelConfig(ulysses_degree=2, shard_weights=True)}


def test_parallel_fp8_equals_serial_fp8() -> None:
    serial = Engine(load_model(tiny_request("flux", "fp8_e4m3fn").model)).generate(tiny_request("flux", "fp8_e4m3fn"))
    results = generate_local_many([tiny_request("flux", "fp8_e4m3fn", parallel=p) for p in PARALLEL.values()])
    errors = {mode: relative_error(result.latent, serial) for mode, result in zip(PARALLEL, results)}
    print("fp8 parallel vs serial:", errors)
    assert errors["pipefusion2"] == 0.0  # warm-up over every step: PipeFusion computes the serial forward
    assert errors["ulysses2"] < 1e-5 and errors["ulysses2-sharded"] < 1e-5  # measured 0.0 both


# ---- against stock ComfyUI ---------------------------------------------------------------------------

def _conditioning(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, 10, TINY_SD3.joint_attention_dim, generator=g),
                        torch.randn(1, TINY_SD3.pooled_projection_dim, generator=g), guidance=None)


def _stock_sample(model, request: GenerationRequest) -> torch.Tensor:
    comfy_sample = import_comfy("comfy.sample")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed)

    def cond(c: Conditioning):
        return [[c.context, {"pooled_output": c.pooled}]]

    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               cond(request.positive), cond(request.negative), latent, disable_pbar=True,
                               seed=request.seed)


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "sd3-tiny.safetensors"
    write_random_model(path, TINY_SD3, seed=5)
    return str(path)


def _sd3_request(path: str, weight_dtype: str) -> GenerationRequest:
    return GenerationRequest(ModelRef(path, "fp32", weight_dtype=weight_dtype), torch.zeros(1, 16, 16, 16),
                             _conditioning(1), _conditioning(2), seed=7, steps=4, cfg=2.5)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("weight_dtype", sorted(FP8))
def test_fp8_gives_stock_comfyuis_fp8_latent(sd3_file: str, weight_dtype: str) -> None:
    """UNETLoader's weight_dtype fp8 (every tensor fp8, manual cast to fp32 on CPU) against our fp8 load of the
    same file, and against the MODEL's own weights as XDiTParallelModel ships them."""
    stock = import_comfy("comfy.sd").load_diffusion_model(sd3_file, model_options={"dtype": FP8[weight_dtype]})
    request = _sd3_request(sd3_file, weight_dtype)
    theirs = _stock_sample(stock, request)
    ours = Engine(load_model(request.model)).generate(request)
    error = relative_error(ours, theirs)
    print(f"{weight_dtype}: relative error against stock ComfyUI's fp8 {error:.1e}")
    assert error < COMFY_BOUND
    state = nodes_module("model_patches").base_weights(stock)  # the MODEL's fp8 tensors, as the node ships them
    assert weight_dtype_of_state(state) == weight_dtype
    shipped = build_adapter(state, read_spec(sd3_file), torch.float32, "cpu", "the MODEL", None, weight_dtype)
    assert torch.equal(Engine(shipped).generate(request), ours)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("weight_dtype", sorted(FP8))
def test_a_lora_on_fp8_weights_is_stored_as_comfyui_stores_it(sd3_file: str, weight_dtype: str) -> None:
    """ComfyUI merges a LoRA into an fp8 weight in float32 and stores it back with stochastic rounding seeded
    by the weight's name; the ranks do the same (merge_lora on the fp8-rounded state)."""
    key = "joint_blocks.0.x_block.attn.qkv.weight"
    g = torch.Generator().manual_seed(4)
    width = TINY_SD3.hidden_size
    patch = LoraPatch(key=key, up=torch.randn(3 * width, 4, generator=g) * 0.1,
                      down=torch.randn(4, width, generator=g) * 0.1, alpha=2.0, strength=0.8)
    stock = import_comfy("comfy.sd").load_diffusion_model(sd3_file, model_options={"dtype": FP8[weight_dtype]})
    adapter = import_comfy("comfy.weight_adapter").LoRAAdapter(set(), (patch.up, patch.down, patch.alpha, None,
                                                                      None, None))
    patched = stock.clone()
    assert patched.add_patches({f"diffusion_model.{key}": adapter}, patch.strength)
    with torch.no_grad():  # as ComfyUI runs a prompt (inference mode)
        patched.patch_model()
        try:
            theirs = patched.model.diffusion_model.state_dict()[key].clone()
        finally:
            patched.unpatch_model()
    ours = merge_lora(stored_state(read_checkpoint(sd3_file), weight_dtype), [patch])[key]
    assert ours.dtype == theirs.dtype == FP8[weight_dtype]
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    plain = stored_state(read_checkpoint(sd3_file), weight_dtype)[key]
    assert not torch.equal(ours.view(torch.uint8), plain.view(torch.uint8))


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_stochastic_rounding_equals_comfyuis() -> None:
    comfy_float = import_comfy("comfy.float")
    seed = import_comfy("comfy.model_patcher").string_to_seed("diffusion_model.w")
    value = torch.randn(300, 70, generator=torch.Generator().manual_seed(2)) * 3
    value[0, :4] = torch.tensor([0.0, 1e-6, 500.0, -1e5])  # zero, subnormal, beyond the range
    for dtype in FP8.values():
        ours, theirs = stochastic_round(value, dtype, "w"), comfy_float.stochastic_rounding(value, dtype, seed=seed)
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), dtype


# ---- the node widget and the CLI flag ------------------------------------------------------------------

@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_load_node_has_unet_loaders_choices_last_with_a_default() -> None:
    import_comfy("folder_paths")
    stock = import_comfy("nodes").UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    last = nodes_module("load_model_node").XDiTLoadModel.define_schema().inputs[-1]
    assert (last.id, last.optional, last.default, list(last.options)) == ("weight_storage", True, "default", stock)


def test_cli_weight_dtype_flag() -> None:
    from comfyui_xdit.cli_commands import build_request, make_parser

    def model(*flags: str) -> ModelRef:
        args = make_parser().parse_args(["generate", "--model", "tiny:flux", "--height", "64", "--width", "64",
                                        "--out", "unused.safetensors", *flags])
        return build_request(args).model

    assert model().weight_dtype == "default"
    assert model("--weight-dtype", "fp8_e5m2").weight_dtype == "fp8_e5m2"
    assert model("--weight-dtype", "fp8_e4m3fn_fast").weight_dtype == "fp8_e4m3fn"
