"""Our socket types in ComfyUI's V3 schema."""

from comfy_api.latest import io

XDiTPoolType = io.Custom("XDIT_POOL")
XDiTModelType = io.Custom("XDIT_MODEL")
CATEGORY = "sampling/xdit"
