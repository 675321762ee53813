"""Test-only ComfyUI nodes (linked into the test host's custom_nodes, never shipped).

Flux conditioning needs T5 and CLIP weights that tests do not have; this node draws a Flux-shaped
CONDITIONING (T5 tokens (1, L, 4096), pooled CLIP (1, 768), guidance) from a seed instead. A probe
node consumes a pool so that a prompt can run the pool node alone.
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
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})},
                "optional": {"width": ("INT", {"default": 4096, "min": 1, "max": 8192}),
                             "pooled_width": ("INT", {"default": 768, "min": 1, "max": 8192}),
                             # HunyuanDiT's CLIP output: masks, and a second stream (mT5) of this many tokens
                             "second_tokens": ("INT", {"default": 0, "min": 0, "max": 1024}),
                             "second_width": ("INT", {"default": 2048, "min": 1, "max": 8192})}}

    def make(self, seed, tokens, guidance, width=4096, pooled_width=768, second_tokens=0, second_width=2048):
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, width, generator=generator)  # another width: another text encoder
        pooled = torch.randn(1, pooled_width, generator=generator)
        extras = {"pooled_output": pooled, "guidance": guidance}
        if second_tokens:  # as comfy/text_encoders/hydit.py: text first, then padding (mask 0)
            extras.update(attention_mask=(torch.arange(tokens) < (tokens + 1) // 2).long()[None],
                          conditioning_mt5xl=torch.randn(1, second_tokens, second_width, generator=generator),
                          attention_mask_mt5xl=(torch.arange(second_tokens) < (second_tokens + 1) // 2).long()[None])
        return ([[context, extras]],)


class XDiTTestPoolProbe:
    """An output node that takes an XDIT_POOL, so a prompt of just the pool node runs (it returns nothing)."""

    CATEGORY = "testing/xdit"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pool": ("XDIT_POOL",)}}

    def probe(self, pool):
        return ()


class _WanTestVAE:
    """Stands in for the Wan VAE in WanImageToVideo (the real one is 500 MB): ``encode`` of (T, H, W, 3) pixels is
    (1, 16, (T - 1) // 4 + 1, H / 8, W / 8), a fixed random map of 8x8-pooled pixels, the first frame alone then
    groups of 4 (the Wan VAE's time stride)."""

    def __init__(self, seed):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(16, 3, generator=generator)
        self.bias = torch.randn(16, generator=generator)

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 8)  # (T, 3, H/8, W/8)
        frames = [x[:1].mean(0)] + [x[i:i + 4].mean(0) for i in range(1, x.shape[0], 4)]
        x = torch.stack(frames, dim=1)  # (3, T', h, w)
        return (torch.einsum("oc,cthw->othw", self.weight, x) + self.bias[:, None, None, None])[None]


class _ClipVisionOutput:
    """What ComfyUI's WAN21 reads of a CLIP_VISION_OUTPUT: its penultimate hidden states."""

    def __init__(self, penultimate_hidden_states):
        self.penultimate_hidden_states = penultimate_hidden_states


class XDiTTestWanImageInputs:
    """A stand-in Wan VAE, a random start image and a random CLIP vision output, for the stock WanImageToVideo."""

    CATEGORY = "testing/xdit"
    RETURN_TYPES = ("VAE", "IMAGE", "CLIP_VISION_OUTPUT")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "width": ("INT", {"default": 64, "min": 8, "max": 4096}),
                             "height": ("INT", {"default": 64, "min": 8, "max": 4096}),
                             "clip_tokens": ("INT", {"default": 9, "min": 1, "max": 1024})}}

    def make(self, seed, width, height, clip_tokens):
        generator = torch.Generator().manual_seed(seed)
        image = torch.rand(1, height, width, 3, generator=generator)
        clip = _ClipVisionOutput(torch.randn(1, clip_tokens, 1280, generator=generator))
        return (_WanTestVAE(seed), image, clip)


NODE_CLASS_MAPPINGS = {"XDiTTestConditioning": XDiTTestConditioning, "XDiTTestPoolProbe": XDiTTestPoolProbe}
NODE_DISPLAY_NAME_MAPPINGS = {"XDiTTestConditioning": "xDiT Test Conditioning (tests only)",
                              "XDiTTestPoolProbe": "xDiT Test Pool Probe (tests only)"}
NODE_CLASS_MAPPINGS["XDiTTestWanImageInputs"] = XDiTTestWanImageInputs
NODE_DISPLAY_NAME_MAPPINGS["XDiTTestWanImageInputs"] = "xDiT Test Wan Image Inputs (tests only)"


class _Wan22TestVAE:
    """Stands in for the Wan 2.2 VAE in Wan22ImageToVideoLatent: ``encode`` of (T, H, W, 3) pixels is
    (1, 48, (T - 1) // 4 + 1, H / 16, W / 16), a fixed random map of 16x16-pooled pixels, the first frame alone then
    groups of 4 (the Wan 2.2 VAE's 16x space and 4x time strides)."""

    def __init__(self, seed):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(48, 3, generator=generator)
        self.bias = torch.randn(48, generator=generator)

    def encode(self, pixels):
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1).float(), 16)  # (T, 3, H/16, W/16)
        frames = [x[:1].mean(0)] + [x[i:i + 4].mean(0) for i in range(1, x.shape[0], 4)]
        x = torch.stack(frames, dim=1)  # (3, T', h, w)
        return (torch.einsum("oc,cthw->othw", self.weight, x) + self.bias[:, None, None, None])[None]


class XDiTTestWan22ImageInputs:
    """A stand-in Wan 2.2 VAE and a random start image, for the stock Wan22ImageToVideoLatent."""

    CATEGORY = "testing/xdit"
    RETURN_TYPES = ("VAE", "IMAGE")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "width": ("INT", {"default": 64, "min": 16, "max": 4096}),
                             "height": ("INT", {"default": 64, "min": 16, "max": 4096})}}

    def make(self, seed, width, height):
        generator = torch.Generator().manual_seed(seed)
        image = torch.rand(1, height, width, 3, generator=generator)
        return (_Wan22TestVAE(seed), image)


NODE_CLASS_MAPPINGS["XDiTTestWan22ImageInputs"] = XDiTTestWan22ImageInputs
NODE_DISPLAY_NAME_MAPPINGS["XDiTTestWan22ImageInputs"] = "xDiT Test Wan 2.2 Image Inputs (tests only)"
