"""Pure pieces of the pool, without a Ray runtime: topology, versions, weights lookup, channel, errors."""

from __future__ import annotations

import socket

import pytest
import torch

from comfyui_xdit.parallel_config import ParallelConfig
from comfyui_xdit.request import GenerationRequest, ModelRef
from comfyui_xdit.model_loader import tiny_conditioning
from comfyui_xdit.models.flux_checkpoint import NAMED_SPECS
from comfyui_xdit.sampling import GenerationCancelled
from comfyui_xdit_workers.channel import JobChannel
from comfyui_xdit_workers.errors import InsecureCluster, NotEnoughDevices, PoolUnreachable, VersionSkew, WorkerError
from comfyui_xdit_workers.job import Job, JobState
from comfyui_xdit_workers.runtime import probe, split_address
from comfyui_xdit_workers.security import refuse_disabled_auth
from comfyui_xdit_workers.settings import HOST_MODELS_FOLDER_ENV, HOST_NO_LOCAL_WEIGHTS_ENV, PoolSettings, Timeouts
from comfyui_xdit_workers.topology import Slot, block_size, group_hosts, order_ranks
from comfyui_xdit_workers.versions import check_versions
from comfyui_xdit_workers.weights import find_local


def test_block_keeps_ring_and_ulysses_on_one_host() -> None:
    config = ParallelConfig(pipefusion_degree=2, ring_degree=2, ulysses_degree=2)
    assert block_size(config, {"a": 4, "b": 4}) == 4
    # 4-device blocks do not fit 2+2+2+2 hosts: ring crosses hosts, ulysses never does
    assert block_size(config, {"a": 2, "b": 2, "c": 2, "d": 2}) == 2


def test_block_errors_name_the_numbers() -> None:
    with pytest.raises(NotEnoughDevices, match="needs 4 devices, the cluster has 3"):
        block_size(ParallelConfig(ulysses_degree=4), {"a": 2, "b": 1})
    with pytest.raises(NotEnoughDevices, match="ulysses_degree 4 must fit on one host"):
        block_size(ParallelConfig(ulysses_degree=4), {"a": 2, "b": 2})


def test_order_ranks_driver_host_first_and_blocks_contiguous() -> None:
    slots = [Slot("n2", "10.0.0.2", 0, 1), Slot("n2", "10.0.0.2", 0, 0),
             Slot("n1", "10.0.0.1", 1, 0), Slot("n1", "10.0.0.1", 1, 1)]
    ordered = order_ranks(slots, first_node="n1")
    assert [(s.node_id, s.bundle) for s in ordered] == [("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1)]
    groups = group_hosts(ParallelConfig(pipefusion_degree=2, ulysses_degree=2), [s.node_id for s in ordered])
    assert all(len(nodes) == 1 for nodes in groups["ulysses"])
    assert all(len(nodes) == 2 for nodes in groups["pipefusion"])
    data = group_hosts(ParallelConfig(data_degree=2, ulysses_degree=2), [s.node_id for s in ordered])
    assert data["data"] == [{"n1", "n2"}] * 2 and all(len(nodes) == 1 for nodes in data["ulysses"])
    assert block_size(ParallelConfig(data_degree=2, ulysses_degree=2), {"a": 2, "b": 2}) == 2


def test_version_skew_names_the_host() -> None:
    here = {"torch": "2.4.0", "diffusers": "0.32.0"}
    check_versions(here, [("rank 0 on a", dict(here))])
    with pytest.raises(VersionSkew, match=r"rank 1 on 10.0.0.9: torch 2.3.1 \(here 2.4.0\)"):
        check_versions(here, [("rank 1 on 10.0.0.9", {"torch": "2.3.1", "diffusers": "0.32.0"})])


def test_weights_lookup_order(tmp_path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "flux.safetensors").write_bytes(b"x")
    ref = ModelRef("/elsewhere/flux.safetensors")
    assert find_local(ref, None, {}) is None
    assert find_local(ref, str(folder), {}) == str(folder / "flux.safetensors")
    assert find_local(ref, None, {HOST_MODELS_FOLDER_ENV: str(folder)}) == str(folder / "flux.safetensors")
    assert find_local(ref, str(folder), {HOST_NO_LOCAL_WEIGHTS_ENV: "1"}) is None
    assert find_local(ModelRef("tiny:flux"), str(folder), {}) is None


def test_channel_stop_answer_is_fixed_per_step() -> None:
    channel = JobChannel()
    channel.open("j")
    assert channel.should_stop("j", 0) is False
    channel.cancel("j")
    assert channel.should_stop("j", 0) is False  # step 0 was already answered: every rank gets False
    assert channel.should_stop("j", 1) is True
    channel.post("j", "e1")
    assert channel.drain("j") == ["e1"] and channel.drain("j") == []
    channel.close("j")


def _request() -> GenerationRequest:
    ref = ModelRef("tiny:flux")
    positive, _ = tiny_conditioning(ref, 0)
    return GenerationRequest(model=ref, latent=torch.zeros(1, 16, 8, 8), positive=positive, steps=2)


def test_job_lifecycle_and_cancel_before_start() -> None:
    cancelled = []
    job = Job("j1", _request(), 5.0, cancelled.append)
    job.cancel()
    assert cancelled == [job] and not job._start()
    assert job.state is JobState.CANCELLED
    with pytest.raises(GenerationCancelled):
        job.result(timeout=1)
    assert list(job.events(timeout=1)) == []
    other = Job("j2", _request(), 5.0, cancelled.append)
    assert other._start()
    with pytest.raises(TimeoutError):
        other.result(timeout=0.05)
    other._fail(WorkerError(1, "10.0.0.2", "generate", ValueError("boom")))
    with pytest.raises(WorkerError, match="rank 1 on host 10.0.0.2 failed in generate: ValueError: boom"):
        other.result(timeout=1)


def test_unreachable_address_is_clear() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PoolUnreachable, match=f"cannot reach the Ray head at 127.0.0.1:{port}.*ray start --head"):
        probe(f"127.0.0.1:{port}", 2.0)
    assert split_address("[::1]:7000") == ("::1", 7000)
    with pytest.raises(ValueError):
        split_address("host:notaport")


def test_pool_refuses_disabled_auth(monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(InsecureCluster, match="RAY_AUTH_MODE=disabled"):
        refuse_disabled_auth()


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        Timeouts(step_s=0)
    with pytest.raises(ValueError):
        PoolSettings(address=" ")
    assert PoolSettings().embedded and not PoolSettings().sends_code
    assert PoolSettings(address="h:6379").sends_code


def test_engine_package_never_imports_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, comfyui_xdit.cli, comfyui_xdit.engine, comfyui_xdit.parallel; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_pipefusion_stage_receives_only_its_blocks() -> None:
    from comfyui_xdit.model_loader import tiny_state
    from comfyui_xdit.models.flux import FluxAdapter
    from comfyui_xdit.models.flux_checkpoint import block_index, stage_state

    spec = NAMED_SPECS["flux"]  # 2 double + 2 single blocks
    state = tiny_state("flux")
    assert block_index("double_blocks.1.img_mod.lin.weight", 2) == 1
    assert block_index("single_blocks.0.linear1.weight", 2) == 2 and block_index("img_in.weight", 2) is None
    stage = stage_state(state, spec.num_layers, (2, 4))
    assert not any(k.startswith("double_blocks.") for k in stage) and "img_in.weight" in stage
    assert sum(v.numel() for v in stage.values()) < sum(v.numel() for v in state.values())
    full = FluxAdapter.from_state_dict(state)
    part = FluxAdapter.from_state_dict(stage, blocks=(2, 4), spec=spec)
    for index in (2, 3):
        for (name, a), (_, b) in zip(full.blocks[index].named_parameters(), part.blocks[index].named_parameters()):
            assert torch.equal(a, b), name


def test_pool_lets_older_models_weights_go() -> None:
    from comfyui_xdit_workers.pool import HELD_MODELS, XDiTPool

    pool = XDiTPool()
    for i in range(HELD_MODELS + 1):
        pool.hold_model(f"comfyui-model:{i}", {"w": torch.zeros(1)}, f"d{i}", ())
    assert list(pool._held) == [f"comfyui-model:{i}" for i in range(1, HELD_MODELS + 1)]
    assert list(pool._held_patches) == [f"d{i}" for i in range(1, HELD_MODELS + 1)]
    pool.hold_model("comfyui-model:1", {"w": torch.ones(1)})  # used again: kept longest
    assert list(pool._held)[-1] == "comfyui-model:1"


def test_pipefusion_checkpoints_keep_the_kv_only_when_the_model_is_known_and_small() -> None:
    """The pool asks PipeFusion jobs for checkpoints; with the K/V when it can read the model's architecture and
    the K/V fits the limit, else without (a retry re-warms): a ComfyUI MODEL's weights or a file only the hosts
    hold must not fail the job (the host tests of XDiTParallelModel with PipeFusion caught that)."""
    from comfyui_xdit_workers.resume_policy import resumable

    positive, _ = tiny_conditioning(ModelRef("tiny:flux"), 0)

    def job(model: str) -> Job:
        request = GenerationRequest(model=ModelRef(model), latent=torch.zeros(1, 16, 8, 8), positive=positive,
                                    parallel=ParallelConfig(pipefusion_degree=2))
        return Job("j", request, 5.0, lambda _: None)

    small = resumable(job("tiny:flux"))
    assert small.checkpoints and small.checkpoint_kv
    assert not resumable(job("tiny:flux"), kv_limit_bytes=1).checkpoint_kv
    unknown = resumable(job("comfyui-model:abc"), spec_of=lambda ref: None)
    assert unknown.checkpoints and not unknown.checkpoint_kv
    from comfyui_xdit.models.families import TINY_SPECS
    from comfyui_xdit.resume import pipefusion_kv_bytes
    for name, spec in TINY_SPECS.items():  # every family's spec gives its K/V size
        assert pipefusion_kv_bytes(spec, (1, 16, 8, 8), 1, 4) > 0, name
