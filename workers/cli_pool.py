"""The pool side of the ``comfyui-xdit`` CLI: ``generate`` on the pool and ``pool status``.

``comfyui_xdit.cli`` imports this lazily, so the engine package never imports Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from comfyui_xdit.request import GenerationRequest

from .errors import PoolError
from .gpu_choice import parse_gpus
from .pool import XDiTPool
from .settings import PoolSettings

logger = logging.getLogger(__name__)

POOL_ERROR_EXIT = 3


def settings_from(args: argparse.Namespace) -> PoolSettings:
    return PoolSettings(address=getattr(args, "address", None) or None,
                        network_interface=getattr(args, "network_interface", None),
                        models_folder=getattr(args, "models_folder", None),
                        gpus=parse_gpus(getattr(args, "gpus", None)))


def generate(request: GenerationRequest, args: argparse.Namespace) -> torch.Tensor:
    """Run ``request`` on the pool (embedded unless ``--address``), logging each step."""
    settings = settings_from(args)
    logger.info("starting the pool (%s)", "embedded local Ray" if settings.embedded else f"Ray at {settings.address}")
    with XDiTPool(settings) as pool:
        logger.info("sampling %d steps as %s", request.sampling_steps, request.parallel.describe())
        job = pool.submit(request)
        for event in job.events():
            logger.info("step %d/%d", event.step, event.total)
        return job.result()


def status(args: argparse.Namespace) -> int:
    with XDiTPool(settings_from(args)) as pool:
        sys.stdout.write(pool.status().format() + "\n")
    return 0


def guarded(run, *args):
    """Pool failures as one line on stderr with exit status 3 (bad input stays ValueError -> 2)."""
    try:
        return run(*args)
    except PoolError as exc:
        sys.stderr.write(f"comfyui-xdit: pool error: {exc}\n")
        sys.exit(POOL_ERROR_EXIT)


def cluster_gpus(address: str, measure_link: bool = False):
    """(hosts, GPUs per host, the measured link between hosts or None) of a running Ray cluster, for
    ``comfyui-xdit plan --address``: the alive nodes that have GPUs (the fewest per host). The link is
    measured (``link_probe``) only when asked and there are two hosts or more."""
    import ray

    from .link_probe import probe_hosts

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"] and int(n["Resources"].get("GPU", 0)) > 0]
        link = None
        if measure_link and len(nodes) > 1:
            link = probe_hosts([n["NodeID"] for n in nodes], [n.get("NodeManagerAddress", "?") for n in nodes])
    finally:
        ray.shutdown()
    gpus = [int(n["Resources"]["GPU"]) for n in nodes]
    if not gpus:
        raise ValueError(f"the Ray cluster at {address} has no GPUs; give --hosts and --gpus-per-host to plan for one")
    return len(gpus), min(gpus), link
