"""comfyui-xdit engine: serial and hybrid-parallel DiT sampling, importable without ComfyUI or Ray."""

__version__ = "0.1.0"
