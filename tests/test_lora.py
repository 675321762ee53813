"""LoRA merging on the ranks against ComfyUI's own ``comfy.lora.calculate_weight`` (in this process)."""

import dataclasses
import pickle
from types import SimpleNamespace

import pytest
import torch

from comfyui_xdit.lora import LohaPatch, LokrPatch, LoraPatch, merge_lora, patches_digest

from comfy_reference import SKIP_REASON, comfy_path, import_comfy
from nodes_package import nodes_module


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


# ---- LoCon, DoRA, LoHa and LoKr against ComfyUI's calculate_weight ----

LINEAR, CONV = (12, 8), (8, 6, 3, 3)
ROWS = (0, 4, 4)  # the patch targets rows 4..7, as a q/k/v LoRA targets a slice of fused qkv
COLUMNS = (1, 2, 4)  # columns 2..5: a non-contiguous view


def _factors(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: (torch.randn(*shape, generator=g) * 0.3).to(dtype)


def _magnitudes(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: (torch.rand(*shape, generator=g) + 0.5).to(dtype)


def _scenario(name, dtype):
    """(weight shape, records): a plain LoRA on the whole weight, then the kind under test on a slice with
    a strength and a model strength."""
    t, m = _factors(sum(map(ord, name)), dtype), _magnitudes(7, dtype)
    at = dict(key="w", strength=0.8, strength_model=0.9, offset=ROWS)
    if name.endswith("conv"):
        base = LoraPatch(key="w", up=t(8, 2, 1, 1), down=t(2, 6, 3, 3), alpha=1.0, strength=0.5)
    else:
        base = LoraPatch(key="w", up=t(12, 2), down=t(2, 8), alpha=1.0, strength=0.5)
    patch = {
        "locon_mid_conv": lambda: LoraPatch(up=t(4, 3, 1, 1), down=t(3, 6, 1, 1), mid=t(3, 3, 3, 3), alpha=1.5, **at),
        "dora_rows": lambda: LoraPatch(up=t(4, 3), down=t(3, 8), alpha=2.0, dora_scale=m(4, 1), **at),
        "dora_columns": lambda: LoraPatch(up=t(12, 3), down=t(3, 4), alpha=None, dora_scale=m(1, 4),
                                          **{**at, "offset": COLUMNS}),
        "dora_strength_one": lambda: LoraPatch(up=t(4, 3), down=t(3, 8), alpha=2.0, dora_scale=m(4, 1),
                                               **{**at, "strength": 1.0}),
        "locon_mid_dora_conv": lambda: LoraPatch(up=t(4, 3, 1, 1), down=t(3, 6, 1, 1), mid=t(3, 3, 3, 3), alpha=1.5,
                                                 dora_scale=m(4, 1, 1, 1), **at),
        "lora_swap_scale_shift": lambda: LoraPatch(up=t(4, 3), down=t(3, 8), alpha=2.0, swap_scale_shift=True, **at),
        "lokr_swap_scale_shift_dora": lambda: LokrPatch(w1=t(2, 2), w2=None, w1_a=None, w1_b=None, w2_a=t(2, 2),
                                                        w2_b=t(2, 4), alpha=2.0, dora_scale=m(4, 1),
                                                        swap_scale_shift=True, **at),
        "loha": lambda: LohaPatch(w1_a=t(4, 2), w1_b=t(2, 8), w2_a=t(4, 3), w2_b=t(3, 8), alpha=3.0, **at),
        "loha_no_alpha": lambda: LohaPatch(w1_a=t(12, 2), w1_b=t(2, 4), w2_a=t(12, 2), w2_b=t(2, 4), alpha=None,
                                           **{**at, "offset": COLUMNS}),
        "loha_dora": lambda: LohaPatch(w1_a=t(4, 2), w1_b=t(2, 8), w2_a=t(4, 2), w2_b=t(2, 8), alpha=1.0,
                                       dora_scale=m(4, 1), **at),
        "loha_tucker_conv": lambda: LohaPatch(w1_a=t(2, 4), w1_b=t(2, 6), w2_a=t(2, 4), w2_b=t(2, 6), t1=t(2, 2, 3, 3),
                                              t2=t(2, 2, 3, 3), alpha=4.0, **at),
        "lokr_whole": lambda: LokrPatch(w1=t(2, 2), w2=t(2, 4), w1_a=None, w1_b=None, w2_a=None, w2_b=None,
                                        alpha=5.0, **at),  # alpha is ignored when both factors are whole
        "lokr_low_rank": lambda: LokrPatch(w1=None, w2=None, w1_a=t(2, 1), w1_b=t(1, 2), w2_a=t(2, 2), w2_b=t(2, 4),
                                           alpha=3.0, **at),
        "lokr_low_rank_no_alpha": lambda: LokrPatch(w1=None, w2=None, w1_a=t(3, 1), w1_b=t(1, 2), w2_a=t(4, 2),
                                                    w2_b=t(2, 2), alpha=None, **{**at, "offset": COLUMNS}),
        "lokr_w1_low_rank": lambda: LokrPatch(w1=None, w2=t(2, 4), w1_a=t(2, 2), w1_b=t(2, 2), w2_a=None, w2_b=None,
                                              alpha=2.0, **at),
        "lokr_w2_low_rank": lambda: LokrPatch(w1=t(2, 2), w2=None, w1_a=None, w1_b=None, w2_a=t(2, 2), w2_b=t(2, 4),
                                              alpha=2.0, **at),
        "lokr_dora": lambda: LokrPatch(w1=t(2, 2), w2=None, w1_a=None, w1_b=None, w2_a=t(2, 2), w2_b=t(2, 4),
                                       alpha=2.0, dora_scale=m(4, 1), **at),
        "lokr_conv": lambda: LokrPatch(w1=None, w2=t(2, 3, 3, 3), w1_a=t(2, 3), w1_b=t(3, 2), w2_a=None, w2_b=None,
                                       alpha=2.0, **at),
    }[name]()
    return (CONV if name.endswith("conv") else LINEAR), [base, patch]


SCENARIOS = ["locon_mid_conv", "dora_rows", "dora_columns", "dora_strength_one", "locon_mid_dora_conv",
             "lora_swap_scale_shift", "lokr_swap_scale_shift_dora", "loha",
             "loha_no_alpha", "loha_dora", "loha_tucker_conv", "lokr_whole", "lokr_low_rank",
             "lokr_low_rank_no_alpha", "lokr_w1_low_rank", "lokr_w2_low_rank", "lokr_dora", "lokr_conv"]


def _comfy_entry(record, adapters):
    """Our record as ComfyUI's ModelPatcher holds it: (strength, adapter, strength_model, offset, function)."""
    if isinstance(record, LoraPatch):
        adapter = adapters.LoRAAdapter(set(), (record.up, record.down, record.alpha, record.mid, record.dora_scale,
                                               None))
    elif isinstance(record, LohaPatch):
        adapter = adapters.LoHaAdapter(set(), (record.w1_a, record.w1_b, record.alpha, record.w2_a, record.w2_b,
                                               record.t1, record.t2, record.dora_scale))
    else:
        adapter = adapters.LoKrAdapter(set(), (record.w1, record.w2, record.alpha, record.w1_a, record.w1_b,
                                               record.w2_a, record.w2_b, None, record.dora_scale))
    function = import_comfy("comfy.utils").swap_scale_shift if record.swap_scale_shift else None
    return (record.strength, adapter, record.strength_model, record.offset, function)


def _comfy_merge(entries, weight, dtype):
    """ComfyUI's merge of one weight: calculate_weight on a float32 copy, rounded to the stored dtype
    (patch_weight_to_device's stochastic_rounding is a plain cast for float32 and bfloat16)."""
    comfy_lora = import_comfy("comfy.lora")
    return comfy_lora.calculate_weight(entries, weight.to(torch.float32, copy=True), "w").to(dtype)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SCENARIOS)
def test_adapter_merge_equals_comfyui_calculate_weight(name, dtype):
    """Every kind we merge, stacked after a plain LoRA, on a slice, with strengths: bit-equal to ComfyUI
    (the same float32 operations in the same order, so no tolerance)."""
    adapters = import_comfy("comfy.weight_adapter")
    shape, records = _scenario(name, dtype)
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    theirs = _comfy_merge([_comfy_entry(r, adapters) for r in records], weight, dtype)
    ours = merge_lora({"w": weight, "other": torch.ones(1)}, records)["w"]
    assert ours.dtype == dtype and torch.equal(ours, theirs)
    without = merge_lora({"w": weight}, records[:1])["w"]
    assert not torch.equal(ours, without)  # the kind under test changed the weight, so equality means something


@pytest.mark.parametrize("name", SCENARIOS)
def test_digest_covers_every_field(name):
    """Changing any tensor or number of any kind of record changes the digest; pickling keeps it."""
    record = _scenario(name, torch.float32)[1][1]
    digest = patches_digest([record])
    assert patches_digest([pickle.loads(pickle.dumps(record))]) == digest
    changed = 0
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, torch.Tensor):
            other = value.clone()
            other.view(-1)[0] += 1.0
        elif isinstance(value, bool):
            other = not value
        elif isinstance(value, float):
            other = value + 0.25
        elif field.name == "offset":
            other = (0, 0, 4)
        elif field.name == "key":
            other = "v"
        else:
            continue  # a None: no value to change
        assert patches_digest([dataclasses.replace(record, **{field.name: other})]) != digest, field.name
        changed += 1
    assert changed >= 6


def test_a_patch_that_does_not_fit_its_weight_is_refused():
    record = LohaPatch(key="w", w1_a=torch.ones(4, 2), w1_b=torch.ones(2, 8), w2_a=torch.ones(4, 2),
                       w2_b=torch.ones(2, 8), alpha=None, strength=1.0)
    with pytest.raises(ValueError, match="LohaPatch on w does not fit .* made for another model"):
        merge_lora({"w": torch.zeros(4, 6)}, [record])


# ---- nodes/model_patches.lora_patches: a ModelPatcher's adapters into records ----

def _model_with_adapters(adapters, dtype):
    """A ModelPatcher-like MODEL whose patches are ComfyUI's own adapters, from several kinds of LoRA."""
    t, m = _factors(11, dtype), _magnitudes(12, dtype)
    linear = [
        (0.7, adapters.LoRAAdapter(set(), (t(12, 3), t(3, 8), 2.0, None, None, None)), 1.0, None, None),
        (0.8, adapters.LoRAAdapter(set(), (t(4, 3), t(3, 8), 1.5, None, m(4, 1), None)), 0.9, (0, 4, 4), None),
        (-0.6, adapters.LoHaAdapter(set(), (t(12, 2), t(2, 8), 2.0, t(12, 2), t(2, 8), None, None, None)), 1.0,
         None, None),
        (1.0, adapters.LoKrAdapter(set(), (None, t(2, 4), 2.0, t(2, 1), t(1, 2), None, None, None, m(4, 1))), 1.0,
         (0, 8, 4), None),
        (0.5, adapters.LoRAAdapter(set(), (t(12, 3), t(3, 8), None, None, None, None)), 1.0, None,
         import_comfy("comfy.utils").swap_scale_shift),  # a diffusers norm_out LoRA: scale and shift swapped
    ]
    conv = [
        (0.5, adapters.LoRAAdapter(set(), (t(8, 3, 1, 1), t(3, 6, 1, 1), 1.0, t(3, 3, 3, 3), None, None)), 1.0,
         None, None),
        (0.9, adapters.LoHaAdapter(set(), (t(2, 4), t(2, 6), 3.0, t(2, 4), t(2, 6), t(2, 2, 3, 3), t(2, 2, 3, 3),
                                           None)), 0.95, (0, 0, 4), None),
        (0.4, adapters.LoKrAdapter(set(), (None, t(4, 3, 3, 3), 2.0, t(2, 1), t(1, 2), None, None, None, None)), 1.0,
         None, None),
    ]
    return SimpleNamespace(patches={"diffusion_model.w": linear, "diffusion_model.c": conv})


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_patches_of_comfy_adapters_merge_as_comfyui(dtype):
    adapters = import_comfy("comfy.weight_adapter")
    model = _model_with_adapters(adapters, dtype)
    records = nodes_module("model_patches").lora_patches(model)
    assert [type(r).__name__ for r in records] == ["LoraPatch", "LoraPatch", "LohaPatch", "LokrPatch", "LoraPatch",
                                                   "LoraPatch", "LohaPatch", "LokrPatch"]
    assert all(r.key in ("w", "c") for r in records) and records[1].dora_scale is not None
    assert [r.swap_scale_shift for r in records] == [False] * 4 + [True] + [False] * 3
    g = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(*LINEAR, generator=g).to(dtype), "c": torch.randn(*CONV, generator=g).to(dtype)}
    ours = merge_lora(state, records)
    for key in ("w", "c"):
        theirs = _comfy_merge(model.patches[f"diffusion_model.{key}"], state[key], dtype)
        assert torch.equal(ours[key], theirs) and not torch.equal(ours[key], state[key]), key


def _refused(adapters):
    lora = adapters.LoRAAdapter(set(), (torch.ones(4, 2), torch.ones(2, 8), None, None, None, None))
    widened = adapters.LoRAAdapter(set(), (torch.ones(4, 2), torch.ones(2, 8), None, None, None, [4, 16]))
    return {
        "oft": ("diffusion_model.w", adapters.OFTAdapter(set(), (torch.ones(2, 2, 2), None, None, None)), None),
        "boft": ("diffusion_model.w", adapters.BOFTAdapter(set(), (torch.ones(2, 2, 2, 2), None, None, None)), None),
        "glora": ("diffusion_model.w", adapters.GLoRAAdapter(set(), (torch.ones(2, 2),) * 4 + (None, None)), None),
        "'diff' (full-weight": ("diffusion_model.w", (torch.ones(4, 8),), None),
        "'set' (full-weight": ("diffusion_model.w", ("set", (torch.ones(4, 8),)), None),
        "reshapes the weight": ("diffusion_model.w", widened, None),
        "goes through a function": ("diffusion_model.w", lora, lambda w: w),
        "outside the diffusion model": ("text_encoder.w", lora, None),
        "Tucker core": ("diffusion_model.w", _lokr_with_tucker_core(adapters), None),
    }


def _lokr_with_tucker_core(adapters):
    """A conv LoKr whose w2 is a Tucker product: t2 (rank, rank, kh, kw), w2_a (rank, c), w2_b (rank, d)."""
    t = _factors(5, torch.float32)
    return adapters.LoKrAdapter(set(), (t(2, 2), None, 2.0, None, None, t(2, 2), t(2, 3), t(2, 2, 1, 1), None))


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
def test_comfyui_itself_cannot_merge_a_lokr_tucker_core():
    """Why we refuse lokr_t2: ComfyUI v0.3.64 logs an error and leaves the weight unpatched (torch.kron
    refuses the einsum's strided result). If this starts failing, ComfyUI merges it: support it then."""
    adapters = import_comfy("comfy.weight_adapter")
    weight = torch.randn(4, 6)
    assert torch.equal(_comfy_merge([(1.0, _lokr_with_tucker_core(adapters), 1.0, None, None)], weight,
                                    torch.float32), weight)


@pytest.mark.skipif(comfy_path() is None, reason=SKIP_REASON)
@pytest.mark.parametrize("words", ["oft", "boft", "glora", "'diff' (full-weight", "'set' (full-weight",
                                   "reshapes the weight", "goes through a function", "outside the diffusion model",
                                   "Tucker core"])
def test_lora_patches_refuse_what_the_ranks_do_not_merge(words):
    key, adapter, function = _refused(import_comfy("comfy.weight_adapter"))[words]
    model = SimpleNamespace(patches={key: [(1.0, adapter, 1.0, None, function)]})
    with pytest.raises(ValueError, match="use the stock KSampler") as refused:
        nodes_module("model_patches").lora_patches(model)
    assert words in str(refused.value)
