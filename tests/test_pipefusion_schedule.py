"""PipeFusion's (step, patch) schedule, stage split and patch split as pure functions."""

from __future__ import annotations

import pytest

from comfyui_xdit.parallel.pipefusion_schedule import (Work, patch_bounds, producer_of_input, simulate,
                                                       split_stages, stage_work)


def test_split_stages_covers_blocks_contiguously() -> None:
    assert split_stages(4, 1) == ((0, 4),)
    assert split_stages(4, 2) == ((0, 2), (2, 4))
    assert split_stages(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert split_stages(5, 2) == ((0, 3), (3, 5))
    assert split_stages(57, 4) == ((0, 15), (15, 29), (29, 43), (43, 57))  # flux-dev: 19 + 38 blocks


def test_split_stages_rejects_more_stages_than_blocks() -> None:
    with pytest.raises(ValueError, match="pipefusion_degree <= 4"):
        split_stages(4, 8)


@pytest.mark.parametrize("tokens,patches", [(64, 2), (64, 4), (256, 8), (10, 3), (7, 7)])
def test_patch_bounds_partition_tokens(tokens: int, patches: int) -> None:
    bounds = patch_bounds(tokens, patches)
    assert len(bounds) == patches
    assert bounds[0][0] == 0 and bounds[-1][1] == tokens
    assert all(stop == nxt for (_, stop), (nxt, _) in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_patch_bounds_rejects_more_patches_than_tokens() -> None:
    with pytest.raises(ValueError, match="use fewer patches"):
        patch_bounds(4, 8)


def test_stage_work_warmup_then_patches() -> None:
    work = list(stage_work(steps=4, warmup_steps=2, num_patches=3))
    assert work == [Work(0, None), Work(1, None), Work(2, 0), Work(2, 1), Work(2, 2), Work(3, 0), Work(3, 1),
                    Work(3, 2)]
    assert [w.is_warmup for w in work[:3]] == [True, True, False]


def test_stage_work_all_warmup_is_serial() -> None:
    assert list(stage_work(steps=3, warmup_steps=3, num_patches=4)) == [Work(0, None), Work(1, None), Work(2, None)]
    assert list(stage_work(steps=3, warmup_steps=9, num_patches=4)) == [Work(0, None), Work(1, None), Work(2, None)]


def test_producer_of_input() -> None:
    assert producer_of_input(Work(1, None), warmup_steps=2) == Work(0, None)
    assert producer_of_input(Work(2, 1), warmup_steps=2) == Work(1, None)  # first patch step reads the whole
    assert producer_of_input(Work(3, 1), warmup_steps=2) == Work(2, 1)


def _stage0_idle(times: dict, steps: int, warmup: int, patches: int) -> list[tuple[Work, float]]:
    """Idle gaps of stage 0 before each item of the steps after the first patch step."""
    items = list(stage_work(steps, warmup, patches))
    gaps = [(work, times[(0, work)][0] - times[(0, before)][1]) for before, work in zip(items, items[1:])
            if work.step > warmup]
    return [(work, gap) for work, gap in gaps if gap > 0]


@pytest.mark.parametrize("stages,patches", [(2, 2), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_no_bubble_after_first_fill_when_patches_cover_stages(stages: int, patches: int) -> None:
    steps, warmup = 6, 1
    times = simulate(stages, steps, warmup, patches)
    assert _stage0_idle(times, steps, warmup, patches) == []
    # every later stage is busy from its first patch item to its last: the only bubble is the first fill
    for stage in range(stages):
        patch_items = [times[(stage, w)] for w in stage_work(steps, warmup, patches) if not w.is_warmup]
        assert all(b[0] == a[1] for a, b in zip(patch_items, patch_items[1:]))
    last = times[(stages - 1, Work(steps - 1, patches - 1))][1]
    warm = times[(stages - 1, Work(warmup - 1, None))][1]
    assert last - warm == (steps - warmup) * patches + stages - 1  # M items per step + one pipeline fill


def test_fewer_patches_than_stages_leaves_bubbles() -> None:
    times = simulate(num_stages=4, steps=4, warmup_steps=1, num_patches=2)
    assert _stage0_idle(times, 4, 1, 2)  # stage 0 waits for the last stage every step


def test_warmup_steps_are_synchronous() -> None:
    stages, patches = 3, 4
    times = simulate(stages, steps=3, warmup_steps=2, num_patches=patches)
    # a warm-up step starts on stage 0 only after the previous one left the last stage
    assert times[(0, Work(1, None))][0] == times[(stages - 1, Work(0, None))][1] == stages * patches


def test_cost_split_balances_the_costliest_stage() -> None:
    double, single = 2.0, 1.0  # Flux-dev: 19 double blocks, then 38 single ones
    costs = [double] * 19 + [single] * 38
    assert split_stages(57, 2, costs) == ((0, 19), (19, 57))  # 38 | 38, where by count it was 48 | 28
    four = split_stages(57, 4, costs)
    assert max(sum(costs[a:b]) for a, b in four) == 20.0  # 76 / 4 = 19 cannot be met: ten double blocks
    assert [b for _, b in four][-1] == 57 and all(a < b for a, b in four)


def test_equal_costs_split_like_the_count() -> None:
    for blocks in range(1, 20):
        for degree in range(1, min(blocks, 8) + 1):
            assert split_stages(blocks, degree, [3.0] * blocks) == split_stages(blocks, degree), (blocks, degree)


def test_cost_split_is_optimal_against_every_split() -> None:
    from itertools import combinations

    costs = [5.0, 1.0, 1.0, 7.0, 2.0, 2.0, 3.0, 9.0, 1.0]
    for degree in (2, 3, 4):
        best = min(max(sum(costs[a:b]) for a, b in zip((0,) + cut, cut + (len(costs),)))
                   for cut in combinations(range(1, len(costs)), degree - 1))
        split = split_stages(len(costs), degree, costs)
        assert max(sum(costs[a:b]) for a, b in split) == best, degree


def test_flux_double_and_single_blocks_cost_about_the_same() -> None:
    """Each is 12 x width^2 per token: the double block's text weights see only the prompt's tokens."""
    from comfyui_xdit.models.block_sizes import block_sizes
    from comfyui_xdit.parallel.pipefusion_schedule import spec_stages
    from comfyui_xdit.planning.full_size import FULL_SIZE

    spec = FULL_SIZE["flux-dev"][0]
    sizes = block_sizes(spec)
    costs = sizes.costs()
    assert 1.0 < costs[0] / costs[-1] < 1.1
    assert sizes.per_text_token[0] == sizes.per_token[0] > 0 and sizes.per_text_token[-1] == 0  # txt_attn + txt_mlp
    assert sizes.per_sample[0] == 4 * sizes.per_sample[-1] > 0  # img_mod + txt_mod (6 x width each) vs 3 x width
    stages = spec_stages(spec, 2)
    assert stages == ((0, 28), (28, 57))  # the 19 double blocks a little costlier: one block moves
    assert max(sum(costs[a:b]) for a, b in stages) / sum(costs) < 0.51


def test_sd3_last_block_is_cheaper_and_the_cut_moves() -> None:
    from comfyui_xdit.models.block_sizes import block_sizes
    from comfyui_xdit.models.families import TINY_SPECS

    costs = block_sizes(TINY_SPECS["sd3"]).costs()
    assert costs[-1] < costs[0]  # its text stream is pre-only: no MLP, no output projection
    assert split_stages(4, 3, costs) == ((0, 1), (1, 2), (2, 4))
