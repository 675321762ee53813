"""The conditional and unconditional branches in one forward where ComfyUI batches them (issue 13.1).

- ``cond_batch.stack``: rows [negative; positive], each repeated to the latent batch; None where ComfyUI's
  ``can_concat_cond`` refuses (a tensor in one branch only, different shapes: prompts of different lengths)
  or a per-prompt scalar differs;
- every tiny family: batched sampling equals two forwards per call to float rounding, in one forward of
  batch 2B per model call (counted at the adapter's blocks), for one-call, multi-call and CFG++ samplers;
- against stock ComfyUI in process (the tiny SD3 file): the same batch sizes reach the model for prompts of
  equal and of different lengths, and the same latent;
- Ulysses 2 and PipeFusion 2 (warm-up = steps, and stale K/V after one warm-up step) on gloo ranks: batched
  equals two forwards (and serial where it should), one forward per item, the same bytes as two forwards;
- PipeFusion's single-process reference (stale K/V per branch): batched equals two forwards.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Iterator

import pytest
import torch

from comfyui_xdit.cond_batch import branch_forwards, stack
from comfyui_xdit.conditioning import Conditioning
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, tiny_conditioning
from comfyui_xdit.models.families import write_random_model
from comfyui_xdit.models.sd3_checkpoint import TINY_SD3
from comfyui_xdit.parallel import create_engine
from comfyui_xdit.parallel.comm import CommCounter
from comfyui_xdit.parallel.launch import run_ranks
from comfyui_xdit.parallel.mesh import Mesh
from comfyui_xdit.parallel.pipefusion_reference import pipefusion_reference
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.sampling import prepare_plan

from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from process_check import no_process_left

STEPS = 3
# latent (H, W), or (T, H, W) for video, per tiny family: PixArt's smallest ComfyUI size is larger
LATENTS = {"flux": (16, 16), "sd3": (16, 16), "pixart-sigma": (32, 40), "hunyuan-dit": (16, 24),
           "qwen-image": (16, 16), "wan21": (3, 4, 8)}
# batched vs two forwards: the same arithmetic on other matrix shapes; measured 4e-7 .. 1.1e-6 (float32)
TOLERANCE = 1e-5


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def request(family: str, sampler: str = "euler", batch: int = 1, cfg: float = 2.5, seed: int = 3,
            **fields) -> GenerationRequest:
    ref = ModelRef(f"tiny:{family}")
    positive, negative = tiny_conditioning(ref, seed=seed)
    channels = 4 if family in ("pixart-sigma", "hunyuan-dit") else 16
    fields = {"positive": positive, "negative": negative, **fields}
    return GenerationRequest(model=ref, latent=torch.zeros(batch, channels, *LATENTS[family]), seed=7, steps=STEPS,
                             cfg=cfg, sampler=sampler, **fields)


class ForwardCounter:
    """Records the batch of every whole forward through ``adapter.run_blocks`` (serial and sequence parallel:
    one call per forward); restores the adapter on exit."""

    def __init__(self, adapter) -> None:
        self.adapter, self.batches = adapter, []

    def __enter__(self) -> "ForwardCounter":
        original = self.adapter.run_blocks

        def counted(state, start, stop):
            self.batches.append(state.hidden.shape[0])
            return original(state, start, stop)

        self.adapter.run_blocks = counted
        return self

    def __exit__(self, *exc) -> None:
        del self.adapter.run_blocks  # the instance attribute; the class's method shows again


def sample_both_ways(adapter, req: GenerationRequest) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int]]:
    with ForwardCounter(adapter) as batched:
        one = Engine(adapter, batch_cfg=True).generate(req)
    with ForwardCounter(adapter) as separate:
        two = Engine(adapter, batch_cfg=False).generate(req)
    return one, batched.batches, two, separate.batches


# ---- stacking ---------------------------------------------------------------------------------------------
def _cond(tokens: int = 4, rows: int = 1, **fields) -> Conditioning:
    g = torch.Generator().manual_seed(tokens * 10 + rows)
    return Conditioning(torch.randn(rows, tokens, 8, generator=g), torch.randn(rows, 3, generator=g), **fields)


def test_stack_puts_the_negative_rows_first_each_repeated_to_the_latent_batch() -> None:
    negative, positive = _cond(rows=1), _cond(rows=2)
    both = stack(negative, positive, batch=2)
    assert both is not None and both.context.shape == (4, 4, 8) and both.pooled.shape == (4, 3)
    assert torch.equal(both.context[:2], negative.context.repeat(2, 1, 1))
    assert torch.equal(both.context[2:], positive.context)
    assert torch.equal(both.pooled[2:], positive.pooled)
    masked = dict(context_mask=torch.ones(1, 4))
    both = stack(_cond(**masked), _cond(**masked), batch=3)
    assert both is not None and both.context_mask.shape == (6, 4)


def test_stack_refuses_what_comfyui_does_not_concatenate() -> None:
    assert stack(_cond(tokens=4), _cond(tokens=6), 1) is None  # CONDRegular: the prompts' token counts differ
    assert stack(_cond(context_mask=torch.ones(1, 4)), _cond(), 1) is None  # a cond key in one branch only
    # a per-prompt scalar that one Conditioning holds for all rows: two forwards (ComfyUI's numbers all the same)
    assert stack(_cond(guidance=3.5), _cond(guidance=4.0), 1) is None
    assert stack(_cond(resolution=(512.0, 512.0)), _cond(), 1) is None
    forwards = branch_forwards([_cond(tokens=4), _cond(tokens=6)], 1)
    assert not forwards.stacked and len(forwards.conds) == 2
    assert len(branch_forwards([_cond(), _cond()], 1, batched=False).conds) == 2
    alone = _cond()
    assert branch_forwards([alone], 1).conds == (alone,)  # one branch (cfg 1): nothing to stack


def test_comfyui_wraps_every_familys_text_tokens_so_that_different_lengths_do_not_concatenate() -> None:
    """What ``stack`` mirrors: each family's ``extra_conds`` puts the text in ``CONDRegular`` (equal shapes
    only), not in the ``CONDCrossAttn`` that repeats shorter prompts to a common length."""
    conds = import_comfy("comfy.conds")
    short, long = torch.zeros(1, 4, 8), torch.zeros(1, 8, 8)
    assert not conds.CONDRegular(short).can_concat(conds.CONDRegular(long))
    assert conds.CONDCrossAttn(short).can_concat(conds.CONDCrossAttn(long))  # the repeat path, for UNets
    model_base = import_comfy("comfy.model_base")
    for name in ("Flux", "SD3", "PixArt", "HunyuanDiT", "QwenImage", "WAN21"):
        source = inspect.getsource(getattr(model_base, name).extra_conds)
        assert "out['c_crossattn'] = comfy.conds.CONDRegular(cross_attn)" in source, name


# ---- every tiny family ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(LATENTS))
def test_batched_equals_two_forwards_in_one_forward_per_call(family: str) -> None:
    adapter = load_model(ModelRef(f"tiny:{family}"))
    req = request(family)
    one, batched, two, separate = sample_both_ways(adapter, req)
    assert batched == [2] * STEPS, family  # one forward of both branches per step
    assert separate == [1] * (2 * STEPS), family
    error = relative(one, two)
    print(f"{family}: batched vs two forwards, max relative difference {error:.1e}")  # noqa: T201
    assert error < TOLERANCE, (family, error)


@pytest.mark.parametrize("sampler,calls", [("heun", 2 * STEPS - 1), ("euler_cfg_pp", STEPS)])
def test_multi_call_and_cfg_pp_samplers_batch_each_call(sampler: str, calls: int) -> None:
    adapter = load_model(ModelRef("tiny:flux"))
    req = request("flux", sampler=sampler, batch=2)  # a batch of two images: forwards of four rows
    one, batched, two, separate = sample_both_ways(adapter, req)
    assert batched == [4] * calls and separate == [2] * (2 * calls)
    assert relative(one, two) < TOLERANCE


def test_cfg_one_runs_the_positive_alone_and_cfg_pp_without_a_negative_stacks_the_positive_twice() -> None:
    adapter = load_model(ModelRef("tiny:sd3"))
    _, batched, _, _ = sample_both_ways(adapter, request("sd3", cfg=1.0))
    assert batched == [1] * STEPS  # ComfyUI skips the uncond branch at cfg 1
    one, batched, two, _ = sample_both_ways(adapter, request("sd3", sampler="euler_cfg_pp", cfg=1.0, negative=None))
    assert batched == [2] * STEPS and relative(one, two) < TOLERANCE


def test_different_length_prompts_run_as_two_forwards_with_the_same_result() -> None:
    adapter = load_model(ModelRef("tiny:flux"))
    positive, _ = tiny_conditioning(ModelRef("tiny:flux"), seed=3, text_len=8)
    _, negative = tiny_conditioning(ModelRef("tiny:flux"), seed=4, text_len=5)
    one, batched, two, separate = sample_both_ways(adapter, request("flux", positive=positive, negative=negative))
    assert batched == separate == [1] * (2 * STEPS)
    assert torch.equal(one, two)


def test_pipefusion_reference_batched_equals_two_forwards_with_stale_kv_per_branch() -> None:
    adapter = load_model(ModelRef("tiny:flux"))
    plan = prepare_plan(adapter, request("flux", sampler="dpmpp_2m"))
    for patches, warmup in ((1, 1), (2, 1), (2, STEPS)):
        one = pipefusion_reference(adapter, plan, patches, warmup)
        two = pipefusion_reference(adapter, dataclasses.replace(plan, batch_cfg=False), patches, warmup)
        assert relative(one, two) < TOLERANCE, (patches, warmup)


# ---- against stock ComfyUI ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "sd3-tiny.safetensors"
    write_random_model(path, TINY_SD3, seed=5)
    return str(path)


def _stock_batches(sd3_file: str, req: GenerationRequest) -> tuple[torch.Tensor, list[int]]:
    """Stock ComfyUI's latent for ``req`` and the batch of every model call its sampler makes."""
    comfy_sample = import_comfy("comfy.sample")
    model = import_comfy("comfy.sd").load_diffusion_model(sd3_file, model_options={"dtype": torch.float32}).clone()
    batches = []

    def wrapper(apply_model, args):
        batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    latent = comfy_sample.fix_empty_latent_channels(model, req.latent)
    noise = comfy_sample.prepare_noise(latent, req.seed)

    def cond(c: Conditioning):
        return [[c.context, {"pooled_output": c.pooled}]]

    out = comfy_sample.sample(model, noise, req.steps, req.cfg, req.sampler, req.scheduler, cond(req.positive),
                              cond(req.negative), latent, disable_pbar=True, seed=req.seed)
    return out, batches


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("negative_len", [8, 5], ids=["same-length", "different-length"])
def test_the_same_batches_reach_the_model_as_in_stock_comfyui(sd3_file: str, negative_len: int) -> None:
    ref = ModelRef(sd3_file, "fp32")
    positive, _ = tiny_conditioning(ModelRef("tiny:sd3"), seed=3, text_len=8)
    _, negative = tiny_conditioning(ModelRef("tiny:sd3"), seed=4, text_len=negative_len)
    req = dataclasses.replace(request("sd3", positive=positive, negative=negative), model=ref)
    theirs, stock = _stock_batches(sd3_file, req)
    adapter = load_model(ref)
    with ForwardCounter(adapter) as ours:
        latent = Engine(adapter).generate(req)
    assert ours.batches == stock == ([2] * STEPS if negative_len == 8 else [1] * (2 * STEPS))
    assert float((latent - theirs).norm() / theirs.norm()) < 1e-4


# ---- Ulysses 2 and PipeFusion 2 on gloo ranks ------------------------------------------------------------
def both_ways(rank: int, world_size: int, reqs: list[GenerationRequest]) -> list:
    """Rank body: each request batched and as two forwards; (latent, this rank's forward batches, bytes per step)
    each (a PipeFusion rank counts the forwards of its stage's blocks)."""
    adapter = load_model(reqs[0].model)
    out = []
    for req in reqs:
        for batch_cfg in (True, False):
            counter = CommCounter()
            engine = create_engine(adapter, req.parallel, rank, Mesh.build(req.parallel, rank), counter,
                                   batch_cfg=batch_cfg)
            with ForwardCounter(adapter) as forwards:
                latent = engine.generate(req)
            out.append((latent, forwards.batches, counter.per_step()))
    return out


@pytest.fixture
def _no_process_left() -> Iterator[None]:
    with no_process_left():
        yield


def test_ulysses_and_pipefusion_batched_equal_two_forwards_with_the_same_bytes(_no_process_left) -> None:
    P = ParallelConfig
    layouts = [P(ulysses_degree=2), P(pipefusion_degree=2, num_patches=2, warmup_steps=STEPS),
               P(pipefusion_degree=2, num_patches=2, warmup_steps=1)]
    reqs = [request("flux", sampler="dpmpp_2m", parallel=layout) for layout in layouts]
    results = run_ranks(2, both_ways, (reqs,), timeout=400)
    adapter = load_model(reqs[0].model)
    serial = Engine(adapter, batch_cfg=False).generate(dataclasses.replace(reqs[0], parallel=ParallelConfig()))
    for index, req in enumerate(reqs):
        (one, batched, bytes_one), (two, separate, bytes_two) = results[2 * index: 2 * index + 2]
        label = req.parallel.describe()
        items = STEPS if req.parallel.warmup_steps >= STEPS else 1 + (STEPS - 1) * req.parallel.patches
        assert batched == [2] * items and separate == [1] * (2 * items), label
        assert relative(one, two) < TOLERANCE, label
        if req.parallel.warmup_steps >= STEPS:  # exactly serial but for rounding
            assert relative(one, serial) < 1e-4, label
        assert bytes_one == bytes_two, label  # one message of 2B rows where two of B went: the same bytes
