"""HTTP routes the plugin adds to ComfyUI's server (also reachable under /api/...)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from .pool_access import registry

logger = logging.getLogger(__name__)

STATUS_PATH = "/xdit/pool/status"


async def pool_status(request: web.Request) -> web.Response:
    """Every live pool: address, interface, and the pool's own report (hosts, devices, state)."""
    loop = asyncio.get_running_loop()
    pools = await loop.run_in_executor(None, registry().status)  # reads Ray's GCS: keep the event loop free
    return web.json_response({"pools": pools})


def register_routes(routes: Any) -> None:
    """Add our routes to ComfyUI's route table (called once, from the extension's on_load)."""
    routes.get(STATUS_PATH)(pool_status)
    logger.debug("registered %s", STATUS_PATH)
