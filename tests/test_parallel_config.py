"""ParallelConfig: derived sizes, and every bad fit raises a ValueError that names the fix."""

from __future__ import annotations

import pytest

from comfyui_xdit.parallel_config import ParallelConfig, suggest

HEADS, TOKENS = 8, 64  # tiny:flux on a 16x16 latent


def test_world_size_and_patches() -> None:
    config = ParallelConfig(cfg_degree=2, pipefusion_degree=2, ring_degree=2, ulysses_degree=2)
    assert config.world_size == 16 and config.sequence_degree == 4 and config.patches == 2
    assert ParallelConfig(pipefusion_degree=2, num_patches=4).patches == 4
    assert ParallelConfig().is_serial


@pytest.mark.parametrize("config", [ParallelConfig(ulysses_degree=8), ParallelConfig(ring_degree=2, ulysses_degree=4),
                                    ParallelConfig(cfg_degree=2, ring_degree=4)])
def test_good_configs_pass(config: ParallelConfig) -> None:
    config.validate_for(8, HEADS, TOKENS, cfg=3.0)


def test_world_mismatch_names_a_fitting_config() -> None:
    with pytest.raises(ValueError, match=r"needs 2 ranks but the world has 4.*e\.g\. .*ulysses 4"):
        ParallelConfig(ulysses_degree=2).validate_for(4, HEADS, TOKENS, cfg=1.0)


def test_heads_not_divisible_by_ulysses() -> None:
    with pytest.raises(ValueError,
                       match=r"ulysses_degree 3 does not divide the model's 8 attention heads.*\[1, 2, 4, 8\]"):
        ParallelConfig(ulysses_degree=3).validate_for(3, HEADS, 48, cfg=1.0)


def test_tokens_not_divisible() -> None:
    with pytest.raises(ValueError, match=r"66 image tokens .* ring 4 x ulysses 1 x patches 1 = 4 .*multiple of 4"):
        ParallelConfig(ring_degree=4).validate_for(4, HEADS, 66, cfg=1.0)
    with pytest.raises(ValueError, match=r"= 16 pieces \(72 / 4 patches = 18 tokens per patch, each split over "
                                         r"ring x ulysses = 4 ranks\).*multiple of 16, fewer patches \(--patches\), "
                                         r"or other degrees, e\.g\. .*ulysses 8"):
        ParallelConfig(pipefusion_degree=2, ring_degree=2, ulysses_degree=2, num_patches=4).validate_for(
            8, HEADS, 72, cfg=1.0)


def test_patches_below_pipefusion() -> None:
    with pytest.raises(ValueError, match=r"num_patches 2 < pipefusion_degree 4.*--patches\) to at least 4"):
        ParallelConfig(pipefusion_degree=4, num_patches=2)


def test_pipefusion_needs_a_warmup_step() -> None:
    with pytest.raises(ValueError, match=r"pipefusion_degree 2 needs warmup_steps >= 1.*--warmup-steps\) to 1"):
        ParallelConfig(pipefusion_degree=2, warmup_steps=0)
    ParallelConfig(warmup_steps=0)  # without PipeFusion there is nothing to warm up


def test_pipefusion_stages_need_blocks() -> None:
    config = ParallelConfig(pipefusion_degree=8)
    config.validate_for(8, HEADS, TOKENS, cfg=1.0)  # the model is not known: no block check
    with pytest.raises(ValueError, match=r"pipefusion_degree 8 exceeds the model's 4 transformer blocks.*"
                                         r"pipefusion_degree <= 4"):
        config.validate_for(8, HEADS, TOKENS, cfg=1.0, num_blocks=4)
    ParallelConfig(pipefusion_degree=4, ring_degree=2).validate_for(8, HEADS, TOKENS, cfg=1.0, num_blocks=4)


def test_tokens_per_patch_split_over_sequence_ranks() -> None:
    with pytest.raises(ValueError, match=r"(?s)64 image tokens .* ring 2 x ulysses 2 x patches 32 = 128 pieces "
                                         r"\(64 / 32 patches = 2 tokens per patch, each split over ring x ulysses "
                                         r"= 4 ranks\).*fewer patches \(--patches\)"):
        ParallelConfig(pipefusion_degree=2, ring_degree=2, ulysses_degree=2, num_patches=32).validate_for(
            8, HEADS, TOKENS, cfg=1.0, num_blocks=4)


def test_cfg_parallel_needs_cfg() -> None:
    with pytest.raises(ValueError, match=r"cfg is 1\.0.*set cfg != 1\.0.*drop CFG parallel"):
        ParallelConfig(cfg_degree=2).validate_for(2, HEADS, TOKENS, cfg=1.0)


@pytest.mark.parametrize("kwargs", [{"cfg_degree": 3}, {"ring_degree": 0}, {"warmup_steps": -1}])
def test_bad_degrees(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ParallelConfig(**kwargs)


def test_suggest_prefers_ulysses_within_heads() -> None:
    assert suggest(8, 4, 64) == ParallelConfig(ring_degree=2, ulysses_degree=4)
    assert suggest(3, 8, 64) is None


def test_data_degree_multiplies_the_world_and_needs_a_big_enough_batch() -> None:
    config = ParallelConfig(data_degree=2, ulysses_degree=2)
    assert config.world_size == 4 and config.group_size == 2 and not config.is_serial
    config.validate_for(4, HEADS, TOKENS, cfg=1.0, batch_size=2)
    config.validate_for(4, HEADS, TOKENS, cfg=1.0)  # no batch given: not checked
    with pytest.raises(ValueError, match=r"data_degree 2 needs a batch of at least 2 images.*lower data_degree "
                                         r"\(--data-degree\) or raise batch_size"):
        config.validate_for(4, HEADS, TOKENS, cfg=1.0, batch_size=1)
    with pytest.raises(ValueError, match="data_degree must be a positive integer"):
        ParallelConfig(data_degree=0)
