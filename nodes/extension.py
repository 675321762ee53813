"""The V3 extension ComfyUI asks for through the root ``comfy_entrypoint``."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

logger = logging.getLogger(__name__)


class XDiTExtension(ComfyExtension):
    def __init__(self) -> None:
        self._routes_added = False

    def _add_routes(self) -> None:
        """Add the pool status route once (ComfyUI builds its app from the route table after loading us)."""
        if self._routes_added:
            return
        from server import PromptServer

        from .routes import register_routes

        if PromptServer.instance is not None:
            register_routes(PromptServer.instance.routes)
            self._routes_added = True

    async def on_load(self) -> None:
        self._add_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI v0.3.64 calls get_node_list but not on_load; newer hosts call both.
        self._add_routes()
        from .load_model_node import XDiTLoadModel
        from .parallel_model_node import XDiTParallelModel
        from .pool_node import XDiTPool
        from .sampler_advanced_node import XDiTSamplerAdvanced
        from .sampler_node import XDiTSampler

        return [XDiTPool, XDiTLoadModel, XDiTParallelModel, XDiTSampler, XDiTSamplerAdvanced]
