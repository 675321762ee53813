"""The speed model and the planner (issue 13): the traffic formulas equal the bytes the engine sends,
model shapes count every weight, predictions behave as the links say, and the planner only offers
layouts the engine accepts. The predictions themselves are modelled; benchmarks/ prints them beside
published numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_xdit.cli_commands import main
from comfyui_xdit.model_loader import tiny_conditioning
from comfyui_xdit.models.families import TINY_SPECS, family_of
from comfyui_xdit.parallel.launch import generate_local_many, stop_helper_processes
from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.planning.full_size import FULL_SIZE
from comfyui_xdit.planning.hardware import ETHERNET, H100, NVLINK, PCIE, Cluster, calibrated
from comfyui_xdit.planning.latency_model import predict
from comfyui_xdit.planning.model_shape import shape_of
from comfyui_xdit.planning.planner import PlanRequest, layouts, plan_layouts
from comfyui_xdit.planning.traffic import CallShape, pipefusion_call_bytes, sequence_call_bytes
from comfyui_xdit.request import GenerationRequest, ModelRef

MODEL = ModelRef("tiny:flux")
LATENT, STEPS, TEXT = 16, 3, 8  # 64 image tokens; tiny_conditioning gives 8 prompt tokens
TINY = shape_of(TINY_SPECS["flux"], "tiny:flux", TEXT)
CALL = CallShape(image_tokens=(LATENT // 2) ** 2, cfg_branches=2, activation_bytes=4)  # float32 weights


def request(parallel: ParallelConfig) -> GenerationRequest:
    positive, negative = tiny_conditioning(MODEL, seed=3)
    return GenerationRequest(model=MODEL, latent=torch.zeros(1, 16, LATENT, LATENT), positive=positive,
                             negative=negative, seed=7, steps=STEPS, cfg=2.5, sampler="euler", parallel=parallel)


def test_traffic_formulas_equal_the_bytes_rank_0_sends() -> None:
    configs = [ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2), ParallelConfig(cfg_degree=2),
               ParallelConfig(pipefusion_degree=2, num_patches=4, warmup_steps=1)]
    try:
        results = generate_local_many([request(c) for c in configs], timeout=300)
    finally:
        stop_helper_processes()
    for config, result in zip(configs, results):
        for step in range(STEPS):
            if config.pipefusion_degree > 1:  # rank 0 is stage 0: it sends activations, nothing back
                expected = pipefusion_call_bytes(TINY, config, CALL, 0, warm=step < config.warmup_steps, sends_back=0)
            else:
                expected = sequence_call_bytes(TINY, config, CALL)
            assert result.comm_bytes[step] == expected, f"{config.describe()} step {step}"


def test_pipefusion_last_stage_sends_its_outputs_back() -> None:
    config = ParallelConfig(pipefusion_degree=2, ring_degree=2, cfg_degree=2, num_patches=2)
    warm = pipefusion_call_bytes(TINY, config, CALL, 1, warm=True, sends_back=64, preview_bytes=10)
    assert warm["pipefusion"] == 64 * 64 * 4 + 10 and warm["cfg"] == 64 * 64 * 4
    assert warm["sequence"] == 1 * 1 * (2 - 1) * 32 * 64 * 4  # one item, one branch, half the tokens
    assert "pipefusion" not in pipefusion_call_bytes(TINY, config, CALL, 1, warm=False, sends_back=0)


def test_shapes_count_every_weight_without_building_them() -> None:
    for name, spec in TINY_SPECS.items():
        state = family_of(spec).random_state(spec, 0) if name in ("flux", "sd3", "qwen-image") else None
        shape = shape_of(spec, name)
        assert shape.blocks == spec.num_blocks and all(p > 0 for p in shape.block_parameters), name
        if state is not None:
            assert shape.parameters == sum(t.numel() for t in state.values()), name
    flux_dev = shape_of(*FULL_SIZE["flux-dev"][:1])
    assert 11.8e9 < flux_dev.parameters < 12.0e9  # Flux.1-dev's published 11.9B
    assert shape_of(FULL_SIZE["pixart-sigma"][0]).parameters == pytest.approx(0.61e9, rel=0.03)  # PixArt-Sigma 0.6B
    # 4x the image tokens (+ 8 prompt tokens): the weights' FLOPs grow with the tokens, attention's with their square
    joint = (256 + TEXT) / (64 + TEXT)
    assert TINY.forward_flops(256) / TINY.forward_flops(64) > joint
    assert TINY.attention_flops(256) / TINY.attention_flops(64) == pytest.approx(joint ** 2)


def _flux_dev_cluster(hosts: int, per_host: int, inter=ETHERNET[10]) -> tuple:
    shape = shape_of(*FULL_SIZE["flux-dev"])
    device = calibrated(H100, 28 * shape.forward_flops(4096), 6.71, 4096)
    return shape, Cluster(hosts, per_host, device, NVLINK, inter)


def test_predictions_follow_compute_and_links() -> None:
    shape, one = _flux_dev_cluster(1, 1)
    call = CallShape(4096, cfg_branches=1)
    assert predict(shape, ParallelConfig(), one, call, 28).seconds == pytest.approx(6.71)  # calibrated on it
    _, host = _flux_dev_cluster(1, 4)
    ulysses4 = predict(shape, ParallelConfig(ulysses_degree=4), host, call, 28)
    assert ulysses4.seconds < 6.71 / 2 and ulysses4.exposed["ulysses"] > 0
    _, over_pcie = _flux_dev_cluster(1, 4)
    over_pcie = dataclasses.replace(over_pcie, intra=PCIE)
    assert predict(shape, ParallelConfig(ulysses_degree=4), over_pcie, call, 28).seconds > ulysses4.seconds
    # two hosts of one GPU over 10 GbE with true CFG: CFG parallel sends one latent per step, Ulysses every layer
    _, two = _flux_dev_cluster(2, 1)
    cfg_call = CallShape(4096, cfg_branches=2)
    cfg = predict(shape, ParallelConfig(cfg_degree=2), two, cfg_call, 28)
    ulysses = predict(shape, ParallelConfig(ulysses_degree=2), two, cfg_call, 28)
    assert cfg.seconds < ulysses.seconds
    best = plan_layouts(shape, two, PlanRequest(cfg_call, 28, use_all_gpus=True))[0]
    assert best.layout.cfg_degree == 2, best.describe()
    # PipeFusion: warm-up calls run the stages one after another, patch calls overlap them
    pf = ParallelConfig(pipefusion_degree=4, num_patches=8, warmup_steps=1)
    assert predict(shape, dataclasses.replace(pf, warmup_steps=28), host, call, 28).seconds > \
        predict(shape, pf, host, call, 28).seconds


def test_planner_offers_only_layouts_the_engine_accepts() -> None:
    shape, cluster = _flux_dev_cluster(2, 4)
    plan = PlanRequest(CallShape(4096, cfg_branches=2), 28)
    found = list(layouts(shape, cluster, plan))
    # 4096 tokens split into no 3, 5, 6 or 7 equal shards or patches (nor do 24 heads into 5 or 7)
    assert {c.world_size for c in found} == {1, 2, 4, 8}
    for layout in found:
        layout.validate_for(layout.world_size, shape.heads, 4096, 2.0, num_blocks=shape.blocks)
    assert any(c.pipefusion_degree > 1 for c in found)
    exact = list(layouts(shape, cluster, dataclasses.replace(plan, exact=True)))
    assert exact and all(c.pipefusion_degree == 1 for c in exact)
    assert all(c.cfg_degree == 1 for c in layouts(shape, cluster, PlanRequest(CallShape(4096, cfg_branches=1))))
    with pytest.raises(ValueError, match="divides by the GPU count"):  # 1 token does not split over 8 GPUs
        plan_layouts(shape, cluster, PlanRequest(CallShape(1, cfg_branches=1), use_all_gpus=True))


def test_plan_command_prints_ranked_layouts(capsys) -> None:
    assert main(["plan", "--model", "tiny:flux", "--width", "256", "--height", "256", "--gpus-per-host", "4",
                 "--cfg", "3.0", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "256 image tokens" in out[0] and out[1].startswith("MODELLED")
    ranked = [line for line in out if line[:2] in ("1.", "2.", "3.")]
    assert len(ranked) == 3 and out[-1].startswith("serial: ")
    seconds = [float(line.rsplit(": ", 1)[1][:-2]) for line in ranked]
    assert seconds == sorted(seconds)
    assert main(["plan", "--model", "tiny:flux", "--width", "250"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_plan_address_plans_with_the_measured_link(capsys, monkeypatch) -> None:
    import comfyui_xdit_workers.cli_pool as cli_pool
    from comfyui_xdit.planning.hardware import Link

    asked = []

    def fake_cluster(address: str, measure_link: bool = False):
        asked.append((address, measure_link))
        return 2, 4, Link("measured 10.0.0.1 <-> 10.0.0.2", 0.5e9, 2e-4) if measure_link else None

    monkeypatch.setattr(cli_pool, "cluster_gpus", fake_cluster)
    assert main(["plan", "--model", "tiny:flux", "--width", "256", "--height", "256", "--address", "x:1"]) == 0
    assert "on 2 x 4" in capsys.readouterr().out and asked[-1] == ("x:1", True)
    capsys.readouterr()
    assert main(["plan", "--model", "tiny:flux", "--width", "256", "--height", "256", "--address", "x:1"]) == 0
    assert main(["plan", "--model", "tiny:flux", "--address", "x:1", "--inter", "10gbe"]) == 0
    out = capsys.readouterr().out
    assert "measured 10.0.0.1 <-> 10.0.0.2 between hosts" in out and "10 GbE between hosts" in out
    assert asked[-1] == ("x:1", False)  # a link given by hand is not measured


def test_scaling_benchmark_predicts_the_published_numbers_it_was_not_fitted_to(tmp_path, monkeypatch) -> None:
    import json
    import runpy
    import sys

    out = tmp_path / "scaling.json"
    benchmarks = __import__("pathlib").Path(__file__).parents[1] / "benchmarks"
    monkeypatch.setattr(sys, "argv", ["scaling_model.py", "--json", str(out), "--plot", str(tmp_path / "s.png")])
    monkeypatch.syspath_prepend(str(benchmarks))  # as running the script does: its folder first on the path
    runpy.run_path(str(benchmarks / "scaling_model.py"), run_name="__main__")
    result = json.loads(out.read_text())
    rows = result["published_vs_modelled"]
    assert [r["role"] for r in rows].count("calibration") == 2 and len(rows) == 7
    for row in rows:  # within a factor of two of every published time, calibrated on single GPUs only
        assert 0.5 <= row["ratio"] <= 2.0, row
    assert {g["gpus"] for g in result["grid"]} == {1, 2, 4, 8, 16}


def test_pool_plan_reads_the_pools_hosts_and_refuses_what_it_cannot_plan(caplog) -> None:
    import logging
    from types import SimpleNamespace as Host

    from comfyui_xdit.planning.pool_plan import PoolHosts, planned_config

    cpu = PoolHosts.of([Host(alive=True, gpus=0, cpus=2), Host(alive=False, gpus=8, cpus=64)])
    assert cpu == PoolHosts((2,), gpus=False)  # a dead host's GPUs are not offered
    gpus = PoolHosts.of([Host(alive=True, gpus=8, cpus=64), Host(alive=True, gpus=4, cpus=32)])
    assert gpus == PoolHosts((8, 4), gpus=True) and gpus.cluster().gpus == 8  # the fewest per host, on each
    spec = TINY_SPECS["sd3"]
    with caplog.at_level(logging.INFO, logger="comfyui_xdit.planning.pool_plan"):
        exact = planned_config(spec, gpus, 1024, 1024, True, "auto (exact)")
    assert exact.pipefusion_degree == 1 and exact.world_size <= 8
    assert "auto layout for sd3 at 1024x1024" in caplog.text and "modelled" in caplog.text
    no_cfg = planned_config(spec, cpu, 128, 128, False, "auto (fastest)")
    assert no_cfg.cfg_degree == 1 and no_cfg.world_size <= 2
    with pytest.raises(ValueError, match="plan_width 120 is not a multiple of 16"):
        planned_config(spec, cpu, 120, 128, True, "auto (exact)")
    with pytest.raises(ValueError, match="choose one of auto"):
        planned_config(spec, cpu, 128, 128, True, "manual")
    with pytest.raises(ValueError, match="no alive host"):
        planned_config(spec, PoolHosts((), gpus=False), 128, 128, True, "auto (exact)")
