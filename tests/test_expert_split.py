"""KSamplerAdvanced's split of one schedule (issue 12 item 3): Wan 2.2's two experts as ComfyUI users build them.

The high-noise expert samples steps [0, k) and returns its leftover noise; the low-noise expert goes on from
step k without adding noise. The request's ``start_step`` / ``end_step`` / ``add_noise`` / ``leftover_noise``
give stock KSamplerAdvanced's latents (in process, two tiny Wan 2.1-architecture files as the experts; SD3 too,
since the split is not Wan's), and every parallel layout gives the serial ones (the plan is shared;
PipeFusion's warm-up counts from the part's own first step).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.families import write_random_model
from comfyui_xdit.models.sd3_checkpoint import TINY_SD3
from comfyui_xdit.models.wan_checkpoint import TINY_WAN21
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sigmas import step_range

from comfy_reference import SKIP_REASON, comfy_path, import_comfy

TEXT_LEN = 7
STEPS, SWITCH = 4, 2  # the experts switch after step 2 of 4
VIDEO = (1, 16, 3, 8, 12)  # 3 latent frames of 64x96 px


@pytest.fixture(scope="module", autouse=True)
def _no_helpers_left():
    yield
    stop_helper_processes()


SMALL = ModelRef("tiny:sd3")  # the split is not Wan's: the cheapest built-in model for the engine-only checks


@pytest.fixture(scope="module")
def small_engine() -> Engine:
    return Engine(load_model(SMALL))


# ---- the schedule's part, as KSampler.sample cuts it -----------------------------------------------

def test_step_range_cuts_the_schedule_as_ksampler_advanced() -> None:
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert torch.equal(step_range(sigmas), sigmas)
    assert torch.equal(step_range(sigmas, 0, 2, full_denoise=False), torch.tensor([1.0, 0.8, 0.6]))  # leftover
    assert torch.equal(step_range(sigmas, 0, 2), torch.tensor([1.0, 0.8, 0.0]))  # force_full_denoise
    assert torch.equal(step_range(sigmas, 2), torch.tensor([0.6, 0.4, 0.2, 0.0]))
    assert torch.equal(step_range(sigmas, 2, 10000), torch.tensor([0.6, 0.4, 0.2, 0.0]))  # past the end: no cut
    assert torch.equal(step_range(sigmas, 1, 3, full_denoise=False), torch.tensor([0.8, 0.6, 0.4]))
    for start, end in ((5, None), (7, None), (3, 3), (4, 2), (0, 0)):  # nothing to sample: the latent as given
        assert step_range(sigmas, start, end).numel() == 0, (start, end)
    assert sigmas[2] == 0.6  # the schedule given is not changed


def test_request_counts_the_steps_of_its_part_and_refuses_negative_steps() -> None:
    positive, _ = tiny_conditioning(SMALL, seed=0)
    base = GenerationRequest(SMALL, torch.zeros(1, 16, 8, 8), positive, steps=20)
    assert dataclasses.replace(base, end_step=10).sampling_steps == 10
    assert dataclasses.replace(base, start_step=10, end_step=10000).sampling_steps == 10
    assert dataclasses.replace(base, start_step=25).sampling_steps == 0
    with pytest.raises(ValueError, match="start_at_step / end_at_step must be >= 0"):
        dataclasses.replace(base, start_step=-1)


def test_an_empty_part_gives_the_latent_back(small_engine) -> None:
    positive, _ = tiny_conditioning(SMALL, seed=0)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    request = GenerationRequest(SMALL, latent, positive, steps=4, start_step=4, add_noise=False)
    assert torch.equal(small_engine.generate(request), latent)


def test_a_split_euler_run_continues_the_whole_run(small_engine) -> None:
    """Euler is deterministic: steps [0, 2) with leftover noise then [2, 4) without noise = all 4 steps (the
    LATENT in between is ComfyUI's: noise scaling undone at step 2's sigma, then redone)."""
    positive, negative = tiny_conditioning(SMALL, seed=2)
    whole = GenerationRequest(SMALL, torch.zeros(1, 16, 8, 8), positive, negative, seed=9, steps=4, cfg=2.0)
    engine = small_engine
    first = engine.generate(dataclasses.replace(whole, end_step=2, leftover_noise=True))
    second = engine.generate(dataclasses.replace(whole, latent=first, start_step=2, add_noise=False))
    expected = engine.generate(whole)
    assert float((second - expected).norm() / expected.norm()) < 1e-5
    forced = engine.generate(dataclasses.replace(whole, end_step=2))  # leftover noise disabled: denoised at step 2
    assert float((forced - first).norm() / first.norm()) > 1e-2


# ---- stock KSamplerAdvanced, in process ---------------------------------------------------------------

def _wan_cond(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, 4096, generator=g), None, guidance=None)


def _sd3_cond(seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, TEXT_LEN, TINY_SD3.joint_attention_dim, generator=g),
                        torch.randn(1, TINY_SD3.pooled_projection_dim, generator=g), guidance=None)


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> tuple[str, str]:
    """Two tiny files of Wan 2.1's architecture with different weights: Wan 2.2's high- and low-noise experts."""
    folder = tmp_path_factory.mktemp("models")
    paths = (folder / "wan22-high-noise-tiny.safetensors", folder / "wan22-low-noise-tiny.safetensors")
    for seed, path in enumerate(paths, start=11):
        write_random_model(path, TINY_WAN21, seed=seed)
    return str(paths[0]), str(paths[1])


@pytest.fixture(scope="module")
def engines(experts) -> tuple[Engine, Engine]:
    return tuple(Engine(load_model(ModelRef(path, "fp32"))) for path in experts)


@pytest.fixture(scope="module")
def stock_experts(experts) -> list:
    comfy_sd = import_comfy("comfy.sd")
    return [comfy_sd.load_diffusion_model(path, model_options={"dtype": torch.float32}) for path in experts]


def _comfy_cond(c: Conditioning) -> list:
    extras = {"pooled_output": c.pooled} if c.pooled is not None else {}
    return [[c.context, extras]]


def _stock_advanced(model, request: GenerationRequest) -> torch.Tensor:
    """ComfyUI's KSamplerAdvanced on ``request``'s values (as its common_ksampler: zero noise when add_noise is
    disabled, force_full_denoise unless the leftover noise is returned)."""
    comfy_sample = import_comfy("comfy.sample")
    latent = comfy_sample.fix_empty_latent_channels(model, request.latent)
    noise = comfy_sample.prepare_noise(latent, request.seed) if request.add_noise else torch.zeros_like(latent)
    negative = request.negative or request.positive
    return comfy_sample.sample(model, noise, request.steps, request.cfg, request.sampler, request.scheduler,
                               _comfy_cond(request.positive), _comfy_cond(negative), latent,
                               disable_noise=not request.add_noise, start_step=request.start_step,
                               last_step=request.end_step if request.end_step is not None else 10000,
                               force_full_denoise=not request.leftover_noise, disable_pbar=True, seed=request.seed)


def _split(high: GenerationRequest, low_model: ModelRef) -> tuple[GenerationRequest, GenerationRequest]:
    """The two samplers of the expert graph; the second's latent is set from the first's output."""
    first = dataclasses.replace(high, end_step=SWITCH, leftover_noise=True)
    second = dataclasses.replace(high, model=low_model, start_step=SWITCH, end_step=10000, add_noise=False)
    return first, second


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).detach().norm() / theirs.detach().norm())


WAN_CASES = {
    "euler-simple": dict(sampler="euler", scheduler="simple", cfg=3.5),
    "euler-ancestral-normal": dict(sampler="euler_ancestral", scheduler="normal", cfg=4.0),  # noise in both parts
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(WAN_CASES))
def test_wan22_expert_switch_equals_stock_ksampler_advanced(case, experts, engines, stock_experts) -> None:
    stock = stock_experts
    assert type(stock[0].model).__name__ == "WAN21"
    high, low = (ModelRef(path, "fp32") for path in experts)
    request = GenerationRequest(model=high, latent=torch.zeros(VIDEO), positive=_wan_cond(1), negative=_wan_cond(2),
                                seed=77, steps=STEPS, **WAN_CASES[case])
    first, second = _split(request, low)
    theirs_first = _stock_advanced(stock[0], first)
    ours_first = engines[0].generate(first)
    assert _relative(ours_first, theirs_first) < 1e-4, "high-noise expert"
    theirs = _stock_advanced(stock[1], dataclasses.replace(second, latent=theirs_first))
    ours = engines[1].generate(dataclasses.replace(second, latent=ours_first))
    assert ours.shape == theirs.shape == VIDEO
    error = _relative(ours, theirs)
    assert error < 1e-4, error
    if case != "euler-simple":
        return
    # the low-noise expert did the last steps: the high-noise one alone gives another video
    alone = engines[0].generate(dataclasses.replace(second, model=high, latent=ours_first))
    assert _relative(alone, theirs) > 1e-2


SD3_CASES = {
    "dpmpp-2m-sde-karras": dict(sampler="dpmpp_2m_sde", scheduler="karras", cfg=4.0),  # a Brownian tree per part
    "uni-pc-simple": dict(sampler="uni_pc", scheduler="simple", cfg=3.0),  # a part ending above sigma 0
    "euler-simple-refine-denoised": dict(sampler="euler", scheduler="simple", cfg=3.0, leftover=False),
}


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("case", sorted(SD3_CASES))
def test_sd3_split_equals_stock_ksampler_advanced(case, tmp_path) -> None:
    """Not Wan only: one SD3 file, steps [0, 2) then [2, 4) as two KSamplerAdvanced; ``leftover=False`` is the
    first sampler fully denoising at step 2 (return_with_leftover_noise disabled) and the second re-noising."""
    options = dict(SD3_CASES[case])
    leftover = options.pop("leftover", True)
    path = tmp_path / "sd3-tiny.safetensors"
    write_random_model(path, TINY_SD3, seed=5)
    stock = import_comfy("comfy.sd").load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    model = ModelRef(str(path), "fp32")
    request = GenerationRequest(model=model, latent=torch.zeros(1, 16, 8, 8), positive=_sd3_cond(1),
                                negative=_sd3_cond(2), seed=31, steps=STEPS, **options)
    first = dataclasses.replace(request, end_step=SWITCH, leftover_noise=leftover)
    second = dataclasses.replace(request, start_step=SWITCH, add_noise=not leftover)
    engine = Engine(load_model(model))
    theirs_first, ours_first = _stock_advanced(stock, first), engine.generate(first)
    assert _relative(ours_first, theirs_first) < 1e-4
    theirs = _stock_advanced(stock, dataclasses.replace(second, latent=theirs_first))
    ours = engine.generate(dataclasses.replace(second, latent=ours_first))
    error = _relative(ours, theirs)
    assert error < 1e-4, error


# ---- parallel layouts equal serial --------------------------------------------------------------------

def test_expert_switch_in_parallel_equals_serial(experts, engines) -> None:
    """Ulysses 2 and PipeFusion 2 (warm-up = the part's 2 steps, so exact; a warm-up counted from step 0 of the
    whole schedule would leave the low-noise part without one) give the serial latents of both experts."""
    high, low = (ModelRef(path, "fp32") for path in experts)
    request = GenerationRequest(model=high, latent=torch.zeros(1, 16, 3, 4, 8), positive=_wan_cond(1),
                                negative=_wan_cond(2), seed=5, steps=STEPS, cfg=3.0, sampler="euler_ancestral")
    first, second = _split(request, low)
    serial_first = engines[0].generate(first)
    second = dataclasses.replace(second, latent=serial_first)
    serial_second = engines[1].generate(second)
    layouts = [ParallelConfig(ulysses_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS - SWITCH)]
    runs = [dataclasses.replace(part, parallel=layout) for layout in layouts for part in (first, second)]
    results = generate_local_many(runs, timeout=300)
    for run, result in zip(runs, results):
        expected = serial_first if run.start_step == 0 else serial_second
        torch.testing.assert_close(result.latent, expected, rtol=1e-4, atol=1e-4,
                                   msg=f"{run.parallel.describe()} steps {run.start_step}..{run.end_step}")


# ---- the node ----------------------------------------------------------------------------------------

KSAMPLER_ADVANCED_INPUTS = ["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                            "negative", "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise"]


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_the_advanced_node_takes_ksampler_advanced_widgets_into_the_request(monkeypatch) -> None:
    import_comfy("comfy_api.latest")  # ComfyUI on the path: the node module imports its schema
    from nodes_package import nodes_module

    node_module = nodes_module("sampler_advanced_node")
    handles = nodes_module("handles")
    node = node_module.XDiTSamplerAdvanced
    schema = node.define_schema()
    names = [i.id for i in schema.inputs]
    assert names[:len(KSAMPLER_ADVANCED_INPUTS)] == KSAMPLER_ADVANCED_INPUTS  # KSamplerAdvanced's order, then shift
    defaults = {i.id: getattr(i, "default", None) for i in schema.inputs}
    assert (defaults["start_at_step"], defaults["end_at_step"], defaults["cfg"]) == (0, 10000, 8.0)
    monkeypatch.setattr(node_module, "run_request", lambda model, request, latent: {"request": request})
    model = handles.ModelHandle(pool=handles.PoolHandle(), model=ModelRef("tiny:wan21"), parallel=ParallelConfig(),
                                spec=TINY_WAN21, name="tiny")
    cond = [[_wan_cond(1).context, {}]]
    latent = {"samples": torch.zeros(VIDEO)}

    def run(**widgets):
        values = dict(add_noise="enable", noise_seed=3, steps=20, cfg=3.5, sampler_name="euler", scheduler="simple",
                      positive=cond, negative=cond, latent_image=latent, start_at_step=0, end_at_step=10000,
                      return_with_leftover_noise="disable") | widgets
        return node.execute(model, **values).result[0]["request"]

    high = run(end_at_step=10, return_with_leftover_noise="enable")
    assert (high.start_step, high.end_step, high.add_noise, high.leftover_noise) == (0, 10, True, True)
    assert (high.seed, high.steps, high.denoise, high.sampling_steps) == (3, 20, 1.0, 10)
    low = run(add_noise="disable", start_at_step=10)
    assert (low.start_step, low.end_step, low.add_noise, low.leftover_noise) == (10, 10000, False, False)
    assert low.sampling_steps == 10


def test_cli_flags_give_the_split() -> None:
    from comfyui_xdit.cli_commands import build_request, make_parser

    def request(*extra: str) -> GenerationRequest:
        return build_request(make_parser().parse_args(["generate", "--model", "tiny:wan21", "--frames", "9", "--height",
                                                       "64", "--width", "96", "--out", "x.safetensors", *extra]))

    plain = request()
    assert (plain.start_step, plain.end_step, plain.add_noise, plain.leftover_noise) == (0, None, True, False)
    high = request("--steps", "20", "--end-step", "10", "--leftover-noise")
    assert (high.end_step, high.leftover_noise, high.sampling_steps) == (10, True, 10)
    low = request("--steps", "20", "--start-step", "10", "--no-add-noise")
    assert (low.start_step, low.add_noise, low.sampling_steps) == (10, False, 10)
