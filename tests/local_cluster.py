"""A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``) the way the pool accepts one:
token authentication on, a head without CPUs, fast health checks so a removed node is noticed at once."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500,
               "health_check_failure_threshold": 3}
# a removed node is noticed within ~10 s, and a raylet that an overloaded machine starves for a few seconds is not
# declared dead (the long soak runs for most of an hour next to other work)
TOLERANT_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_timeout_ms": 3000,
                   "health_check_failure_threshold": 6}


@contextmanager
def token_cluster(hosts: int, cpus: int = 2, env_vars: Optional[dict] = None,
                  health: Optional[dict] = None) -> Iterator[tuple[Any, list]]:
    """(cluster, host nodes): ``hosts`` nodes of ``cpus`` CPUs each (with ``env_vars``; the head's health checks
    ``health``, default FAST_HEALTH); everything is shut down after, this process's Ray connection included, and
    the auth mode it had is restored."""
    import ray
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"  # the token in ~/.ray; the pool refuses clusters without one
    Config.initialize("")  # this process re-reads the mode, as `ray.init` does when it turns token auth on
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                "_system_config": health or FAST_HEALTH})
        nodes = [cluster.add_node(num_cpus=cpus, env_vars=env_vars or {}) for _ in range(hosts)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        Config.initialize("")
