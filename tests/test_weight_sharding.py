"""Weight sharding (FSDP2, ``parallel/weight_sharding.py``): the same latent with 1/N of the blocks per rank.

Each world (2 and 4 local gloo ranks, NCCL's rules on, so a rank that issued its all-gathers in another
order than its shard group would fail) is spawned once: every layout samples with ``shard_weights`` and
without, and both equal serial; a probe on the same ranks measures what a rank holds between and during
block forwards; at 4 ranks the pool's rank worker loads, shards and evicts as the pool drives it. Then the
refusal of one rank per stage, the CLI flag, and the node widget in a real ComfyUI host with its Ray pool.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from comfy_host import comfy_host  # noqa: F401  (fixture)
from process_check import no_process_left
from comfyui_xdit.engine import Engine
from comfyui_xdit.model_loader import load_model, model_spec, tiny_conditioning
from comfyui_xdit.models.absent_block import AbsentBlock
from comfyui_xdit.parallel import create_engine
from comfyui_xdit.parallel.launch import RankFailed, generate_requests, run_ranks
from comfyui_xdit.parallel.pipefusion_schedule import stage_blocks
from comfyui_xdit.parallel.weight_sharding import full_bytes, is_gathered, resident_bytes, shard_ranks, shard_weights
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef

P = ParallelConfig
STEPS = 3


def sharded(parallel: ParallelConfig) -> ParallelConfig:
    return dataclasses.replace(parallel, shard_weights=True)


LATENTS = {"tiny:wan21": (3, 4, 8), "tiny:pixart-sigma-narrow": (32, 40)}  # (T, H, W) of a video, else (H, W)
# (model, layout, sampler, batch, weight storage); PipeFusion warms up for every step, so it equals serial too
CASES = {
    2: [("tiny:flux", P(ulysses_degree=2), "euler", 1, "default"),
        ("tiny:flux", P(ring_degree=2), "dpmpp_2m", 1, "default"),
        ("tiny:flux", P(cfg_degree=2), "euler_ancestral", 1, "default"),
        ("tiny:sd3", P(ulysses_degree=2), "euler", 1, "default"),
        ("tiny:wan21", P(ring_degree=2), "euler", 1, "default"),
        ("tiny:hunyuan-dit-narrow", P(ulysses_degree=2), "euler", 1, "default"),
        ("tiny:pixart-sigma-narrow", P(ulysses_degree=2), "euler", 1, "default"),
        ("tiny:flux", P(ulysses_degree=2), "euler", 1, "fp8_e4m3fn")],  # fp8-stored weights gathered as fp8
    4: [("tiny:flux", P(pipefusion_degree=2, ulysses_degree=2, warmup_steps=STEPS), "dpmpp_2m", 1, "default"),
        ("tiny:flux", P(cfg_degree=2, pipefusion_degree=2, warmup_steps=STEPS), "euler", 1, "default"),
        ("tiny:flux", P(cfg_degree=2, ulysses_degree=2), "dpmpp_2m", 1, "default"),
        ("tiny:qwen-image", P(data_degree=2, ring_degree=2), "euler", 2, "default")],
}
PROBES = {2: P(ulysses_degree=2), 4: P(pipefusion_degree=2, ulysses_degree=2, warmup_steps=1, num_patches=4)}


def request(model: str, parallel: ParallelConfig, sampler: str = "euler", batch: int = 1,
            weight_dtype: str = "default") -> GenerationRequest:
    ref = ModelRef(model, weight_dtype=weight_dtype)
    positive, negative = tiny_conditioning(ref, seed=3)
    latent = torch.zeros(batch, 16, *LATENTS.get(model, (16, 16)))
    return GenerationRequest(model=ref, latent=latent, positive=positive, negative=negative, seed=7, steps=STEPS,
                             cfg=2.5, sampler=sampler, parallel=parallel)


def probe(rank: int, parallel: ParallelConfig) -> dict:
    """Shard tiny:flux over ``parallel``'s shard group and sample once, recording at each block's start how
    many blocks are whole on this rank and how many all-gathers are in flight."""
    ref = ModelRef("tiny:flux")
    adapter = load_model(ref, blocks=stage_blocks(parallel, rank, model_spec(ref)))
    present = [b for b in adapter.blocks if not isinstance(b, AbsentBlock)]
    block_bytes = sum(full_bytes(b) for b in present)
    shared = full_bytes(adapter.transformer) - block_bytes
    shard_weights(adapter, parallel, rank)
    before = resident_bytes(adapter.transformer)

    def in_flight(block: torch.nn.Module) -> bool:  # FSDP2 internals, read only: a prefetched all-gather's result
        return block._get_fsdp_state()._fsdp_param_group._all_gather_result is not None

    seen: list[tuple[int, int, int, bool]] = []  # (block, whole blocks, all-gathers in flight, next one in flight)

    def at_start(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:  # runs after FSDP's pre-hook (it is prepended)
            following = present[index + 1] if index + 1 < len(present) else None
            seen.append((index, sum(map(is_gathered, present)), sum(map(in_flight, present)),
                         following is not None and in_flight(following)))
        return hook

    for index, block in enumerate(present):
        block.register_forward_pre_hook(at_start(index))
    create_engine(adapter, parallel, rank).generate(request("tiny:flux", parallel))
    return {"before": before, "after": resident_bytes(adapter.transformer), "blocks": block_bytes, "shared": shared,
            "group": len(shard_ranks(parallel, rank)), "seen": seen, "absent_params": sum(
                p.numel() for b in adapter.blocks if isinstance(b, AbsentBlock) for p in b.parameters())}


# What the pool's rank worker does with one model slot: a sharded PipeFusion stage, the same model sharded over
# the whole world (the stage's group is freed when that evicts it), then unsharded
WORKER_LAYOUTS = [sharded(P(pipefusion_degree=2, ulysses_degree=2, warmup_steps=STEPS)),
                  sharded(P(cfg_degree=2, ulysses_degree=2)), P(cfg_degree=2, ulysses_degree=2)]


def as_pool_rank(rank: int, world_size: int, layouts: list[ParallelConfig]) -> list:
    """``RankWorker.load`` then its engine for each layout, on a rank that already joined the world."""
    from comfyui_xdit_workers.actor import RankSetup, RankWorker
    from comfyui_xdit_workers.weights import WeightSource

    worker = RankWorker(models_per_rank=1)
    worker.setup_info, worker.device = RankSetup(rank, world_size, "cpu"), torch.device("cpu")
    out = []
    for layout in layouts:
        worker.load(WeightSource(ModelRef("tiny:flux")), layout)
        latent = worker.engine.generate(request("tiny:flux", layout, "euler"))
        out.append((latent, worker.weights_how, len(worker.shards), len(worker.cached)))
    return out


def rank_body(rank: int, world_size: int, requests: list[GenerationRequest], probe_layout: ParallelConfig,
              worker_layouts: list[ParallelConfig]) -> tuple:
    """Every rank: the requests (generate_requests), the probe (rank 0 gathers every rank's), the pool worker."""
    import torch.distributed as dist

    results = generate_requests(rank, world_size, requests)
    measured = [None] * world_size
    dist.all_gather_object(measured, probe(rank, sharded(probe_layout)))
    return [r.latent for r in results], measured, as_pool_rank(rank, world_size, worker_layouts)


@pytest.fixture(scope="module", autouse=True)
def _no_process_left() -> Iterator[None]:
    with no_process_left(skip_comfy_host=True):
        yield


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_unsharded_and_serial_with_a_share_of_the_weights(world: int) -> None:
    cases = CASES[world]
    requests = [request(m, layout, s, b, w) for m, config, s, b, w in cases for layout in (config, sharded(config))]
    worker_layouts = WORKER_LAYOUTS if world == 4 else []
    latents, measured, worker = run_ranks(world, rank_body, (requests, PROBES[world], worker_layouts), timeout=400)
    for i, (model, config, sampler, batch, storage) in enumerate(cases):
        plain, shared = latents[2 * i], latents[2 * i + 1]
        what = f"{model} {storage} {config.describe()}"
        torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-6, msg=what)  # the same numbers, gathered
        serial = Engine(load_model(ModelRef(model, weight_dtype=storage))).generate(
            request(model, ParallelConfig(), sampler, batch, storage))
        error = float((shared - serial).abs().max() / serial.abs().max())
        assert error < 1e-4, f"{what}: relative error {error} to serial"

    for rank, probe_result in enumerate(measured):
        n = probe_result["group"]
        assert n == 2, rank
        # between forwards: 1/N of the blocks (FSDP pads a dim-0 shard by less than a row) plus the shared tensors
        expected = probe_result["blocks"] / n + probe_result["shared"]
        assert abs(probe_result["before"] - expected) <= 0.01 * expected, (rank, probe_result["before"], expected)
        assert probe_result["after"] == probe_result["before"], rank  # every block resharded after its forward
        assert probe_result["absent_params"] == 0
        seen = probe_result["seen"]
        assert seen, f"rank {rank} ran no block"
        # during a block's forward: that block whole, at most one more arriving (the next, prefetched)
        assert all(whole == 1 and flight <= 1 for _, whole, flight, _ in seen), (rank, seen)
        last = max(index for index, *_ in seen)
        assert all(next_in_flight for index, _, _, next_in_flight in seen if index < last), (rank, seen)
    # the ranks' shards add up to the blocks once (each rank's share differs by padding only)
    total = sum(r["before"] - r["shared"] for r in measured)
    assert total == sum(r["blocks"] for r in measured) // 2

    if worker:  # the pool's rank worker: the same latents, one model slot, a stage group freed on eviction
        serial = Engine(load_model(ModelRef("tiny:flux"))).generate(request("tiny:flux", ParallelConfig(), "euler"))
        for layout, (latent, how, shards, cached) in zip(worker_layouts, worker):
            torch.testing.assert_close(latent, serial, rtol=1e-4, atol=1e-4, msg=layout.describe())
            assert ("sharded over ranks" in how) == layout.shard_weights, how
            assert (shards, cached) == (int(layout.shard_weights), 1), layout.describe()
        assert "sharded over ranks [0, 1]" in worker[0][1]  # rank 0's stage: pipefusion 0, ulysses 0 and 1


def gather_out_of_order(rank: int, world_size: int) -> None:
    """Rank body: rank 0 gathers a double block's weights, rank 1 a single block's, at the same point."""
    adapter = load_model(ModelRef("tiny:flux"))
    sharding = shard_weights(adapter, P(ulysses_degree=world_size, shard_weights=True), rank)
    sharding.blocks[0 if rank == 0 else 2].unshard()


def test_an_all_gather_out_of_step_fails_under_nccl_rules() -> None:
    """The NCCL-rules shim of the tests compares FSDP2's all-gathers too, so the parity runs above show that
    every rank of a shard group gathered the same blocks in the same order."""
    with pytest.raises(RankFailed, match="issue different collectives"):
        run_ranks(2, gather_out_of_order, timeout=240)


def without_root_hook(rank: int, world_size: int) -> tuple:
    """Rank body: shard as on a torch whose FSDP2 lacks the private root hook; sample sharded and not."""
    from comfyui_xdit.parallel import weight_sharding

    weight_sharding.ROOT_INIT = "_lazy_init_renamed_in_a_future_torch"  # this rank process only
    layout = P(ulysses_degree=world_size, shard_weights=True)
    plain, adapter = load_model(ModelRef("tiny:flux")), load_model(ModelRef("tiny:flux"))
    sharding = shard_weights(adapter, layout, rank)
    latents = [create_engine(a, layout, rank).generate(request("tiny:flux", layout)) for a in (plain, adapter)]
    return sharding.prefetch, latents, resident_bytes(adapter.transformer) < full_bytes(adapter.transformer)


def test_a_torch_without_the_private_root_hook_shards_without_prefetch() -> None:
    """``_name_root`` leans on FSDP2's private ``FSDPState._lazy_init`` (present in the tested torch: the parity
    runs above prefetch); without it the weights stay sharded, the latent the same."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    assert callable(getattr(FSDPState, "_lazy_init", None)), "the tested torch has FSDP2's root hook"
    prefetch, (plain, shared), smaller = run_ranks(2, without_root_hook, timeout=240)
    assert not prefetch and smaller
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-6)


def test_one_rank_per_stage_is_refused_with_the_fix() -> None:
    for layout in (dict(), dict(pipefusion_degree=2), dict(pipefusion_degree=4)):
        with pytest.raises(ValueError, match=r"more than one rank per PipeFusion stage.*ulysses_degree 2.*"
                                             r"--shard-weights"):
            ParallelConfig(shard_weights=True, **layout)
    assert ParallelConfig(pipefusion_degree=2, ulysses_degree=2, shard_weights=True).shard_group_size == 2
    assert ParallelConfig(ulysses_degree=2, shard_weights=True).describe().endswith("weights sharded over 2 ranks")
    assert "sharded" not in ParallelConfig(ulysses_degree=2).describe()


def test_shard_groups_are_the_ranks_of_a_stage() -> None:
    assert shard_ranks(P(cfg_degree=2, ulysses_degree=2), 3) == (0, 1, 2, 3)
    # (cfg, pipefusion, ulysses) = 2 x 2 x 2: stage 0 holds ranks 0, 1, 4, 5
    layout = P(cfg_degree=2, pipefusion_degree=2, ulysses_degree=2)
    assert shard_ranks(layout, 5) == (0, 1, 4, 5) and shard_ranks(layout, 2) == (2, 3, 6, 7)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_shard_weights_flag(tmp_path) -> None:
    common = ["generate", "--model", "tiny:flux", "--seed", "2", "--steps", "2", "--cfg", "2.0", "--height", "64",
              "--width", "64", "--in-process"]
    for name, extra in (("serial", []), ("sharded", ["--ulysses", "2", "--shard-weights"])):
        done = _cli(*common, *extra, "--out", str(tmp_path / f"{name}.safetensors"))
        assert done.returncode == 0, done.stderr
    serial = load_file(str(tmp_path / "serial.safetensors"))["samples"]
    torch.testing.assert_close(load_file(str(tmp_path / "sharded.safetensors"))["samples"], serial, rtol=1e-4,
                               atol=1e-4)
    bad = _cli(*common, "--shard-weights", "--out", str(tmp_path / "x.safetensors"))
    assert bad.returncode == 2 and "more than one rank per PipeFusion stage" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and "xdit-rank" not in bad.stderr


# ---- through the nodes, in a real ComfyUI host (skipped without COMFYUI_PATH) -----------------------------------
NODE_MODEL = "sd3-tiny.safetensors"  # a tiny file the host writes (comfy_host.FAMILY_FILES): 4 heads, 64 / 32 wide


def node_prompt() -> dict:
    """Ulysses 2 on the pool's two CPU ranks three ways: XDiTLoadModel unsharded and sharded, and UNETLoader's
    MODEL through XDiTParallelModel sharded."""
    cond = {"tokens": 8, "guidance": 0.0, "width": 64, "pooled_width": 32}
    layout = {"weight_dtype": "default", "ulysses_degree": 2, "ring_degree": 1, "pipefusion_degree": 1,
              "num_patches": 0, "warmup_steps": 1, "cfg_parallel": False}
    prompt = {
        "pos": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 1, **cond}},
        "neg": {"class_type": "XDiTTestConditioning", "inputs": {"seed": 2, **cond}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": NODE_MODEL, "weight_dtype": "default"}},
        "pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
        "plain": {"class_type": "XDiTLoadModel", "inputs": {"pool": ["pool", 0], "unet_name": NODE_MODEL, **layout}},
        "sharded": {"class_type": "XDiTLoadModel",
                    "inputs": {"pool": ["pool", 0], "unet_name": NODE_MODEL, **layout, "shard_weights": True}},
        "from_model": {"class_type": "XDiTParallelModel",
                       "inputs": {"pool": ["pool", 0], "model": ["unet", 0], **layout, "shard_weights": True}},
    }
    for name in ("plain", "sharded", "from_model"):
        prompt[f"sample_{name}"] = {"class_type": "XDiTSampler", "inputs": {
            "model": [name, 0], "seed": 42, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "sigma_shift": "model default", "max_shift": 1.15, "base_shift": 0.5, "width": 128, "height": 128}}
        prompt[f"save_{name}"] = {"class_type": "SaveLatent",
                                  "inputs": {"samples": [f"sample_{name}", 0], "filename_prefix": f"shard_{name}"}}
    return prompt


def test_nodes_shard_weights_widget_refusal_and_parity(comfy_host) -> None:
    from test_comfy_nodes import saved_latent

    info = comfy_host.get_json("/object_info")
    for node in ("XDiTLoadModel", "XDiTParallelModel"):
        widget = info[node]["input"]["optional"]["shard_weights"]
        assert widget[0] == "BOOLEAN" and widget[1]["default"] is False, widget  # optional: old workflows load
        order = info[node]["input_order"]["optional"]
        assert order.index("shard_weights") > order.index("plan_height"), order  # after the older widgets
    alone = node_prompt()
    alone["sharded"]["inputs"]["ulysses_degree"] = 1
    alone = {k: v for k, v in alone.items() if k in ("pos", "neg", "latent", "pool", "sharded", "sample_sharded",
                                                     "save_sharded")}
    status, body = comfy_host.queue(alone, "shard-alone")
    assert status == 400, body
    text = " ".join(e["details"] for e in body["node_errors"]["sharded"]["errors"])
    assert "more than one rank per PipeFusion stage" in text and "ulysses_degree 2" in text, text
    with comfy_host.connect() as ws:
        result = ws.run(node_prompt(), timeout=400)
    assert result.succeeded, result.describe() + "\n" + comfy_host.log_tail()
    executed = result.of_type("executed")
    plain = saved_latent(comfy_host, executed, "save_plain")
    for name in ("sharded", "from_model"):
        torch.testing.assert_close(saved_latent(comfy_host, executed, f"save_{name}"), plain, rtol=1e-5, atol=1e-5,
                                   msg=name)
