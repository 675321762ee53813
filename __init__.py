"""ComfyUI entry point: ComfyUI imports this folder from custom_nodes/ and asks for our extension."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 node registration; imports stay inside so loading the folder has no side effects."""
    from .nodes.extension import XDiTExtension

    return XDiTExtension()
