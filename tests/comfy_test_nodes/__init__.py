"""Test-only ComfyUI node (linked into the test host's custom_nodes, never shipped).

Flux conditioning needs T5 and CLIP weights that tests do not have; this node draws a Flux-shaped
CONDITIONING (T5 tokens (1, L, 4096), pooled CLIP (1, 768), guidance) from a seed instead.
"""

import torch


class XDiTTestConditioning:
    CATEGORY = "testing/xdit"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})}}

    def make(self, seed, tokens, guidance):
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, 4096, generator=generator)
        pooled = torch.randn(1, 768, generator=generator)
        return ([[context, {"pooled_output": pooled, "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"XDiTTestConditioning": XDiTTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"XDiTTestConditioning": "xDiT Test Conditioning (tests only)"}
