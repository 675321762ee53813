"""LoRA merging on the ranks against ComfyUI's own ``comfy.lora.calculate_weight`` (in this process)."""

import pytest
import torch

from comfyui_xdit.lora import LoraPatch, merge_lora, patches_digest

from comfy_reference import SKIP_REASON, comfy_path, import_comfy


def _patch(key, out_f, in_f, rank, strength, seed, alpha=None, strength_model=1.0, offset=None):
    g = torch.Generator().manual_seed(seed)
    return LoraPatch(key=key, up=torch.randn(out_f, rank, generator=g) * 0.1, down=torch.randn(rank, in_f, generator=g) * 0.1,
                     alpha=alpha, strength=strength, strength_model=strength_model, offset=offset)


def test_digest_names_values_and_strengths():
    a = _patch("w", 6, 4, 2, 0.7, 1)
    assert patches_digest([a]) == patches_digest([_patch("w", 6, 4, 2, 0.7, 1)]) != patches_digest([])
    assert patches_digest([a]) != patches_digest([_patch("w", 6, 4, 2, 0.6, 1)])
    assert patches_digest([a]) != patches_digest([_patch("w", 6, 4, 2, 0.7, 2)])


def test_a_patch_on_a_missing_tensor_names_it():
    with pytest.raises(ValueError, match="made for another model"):
        merge_lora({"a": torch.zeros(2, 2)}, [_patch("b", 2, 2, 1, 1.0, 0)])


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_comfyui_calculate_weight(dtype):
    """Two stacked LoRAs, one with alpha on the whole weight, one on a slice (a q/k/v LoRA on fused qkv)
    with a model strength, rounded to the stored dtype as ComfyUI's patch_weight_to_device does."""
    comfy_lora = import_comfy("comfy.lora")
    adapters = import_comfy("comfy.weight_adapter")
    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    patches = [_patch("w", 12, 8, 4, 0.7, 1, alpha=2.0), _patch("w", 4, 8, 2, -0.3, 2, strength_model=0.9,
                                                               offset=(0, 4, 4))]
    theirs_list = [(p.strength, adapters.LoRAAdapter(set(), (p.up, p.down, p.alpha, None, None, None)),
                    p.strength_model, p.offset, None) for p in patches]
    theirs = comfy_lora.calculate_weight(theirs_list, weight.to(torch.float32, copy=True), "w").to(dtype)
    ours = merge_lora({"w": weight, "other": torch.ones(1)}, patches)
    assert torch.equal(ours["w"], theirs) and ours["w"].dtype == dtype
    assert not torch.equal(ours["w"], weight)
