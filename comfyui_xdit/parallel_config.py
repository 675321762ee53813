"""How one engine is spread over ranks: data x cfg x pipefusion x ring x ulysses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each parallel axis; their product is the engine's world size.

    ``num_patches`` (PipeFusion's M) defaults to ``pipefusion_degree``; ``warmup_steps`` are the
    synchronous full steps PipeFusion runs before it starts reusing one-step-stale K/V.
    ``data_degree`` splits the images of a batch over that many rank groups (xDiT's data parallel degree),
    each laid out as cfg x pipefusion x ring x ulysses.
    ``shard_weights`` keeps 1/N of every transformer block on each of the N ranks that run it (FSDP2:
    a block's weights are gathered just before it runs, ``parallel/weight_sharding.py``); it needs N > 1,
    i.e. more than one rank per PipeFusion stage.
    ``stage_split``: the first block of every PipeFusion stage after the first (e.g. ``(3,)``: blocks 0-2, then 3
    on), to cut the stages by measured block times (``parallel/block_timing.py``); empty: by each block's
    FLOPs (``models/block_sizes.py``).
    """

    data_degree: int = 1
    cfg_degree: int = 1
    pipefusion_degree: int = 1
    ring_degree: int = 1
    ulysses_degree: int = 1
    num_patches: int | None = None
    warmup_steps: int = 1
    shard_weights: bool = False
    stage_split: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("data_degree", "cfg_degree", "pipefusion_degree", "ring_degree", "ulysses_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"cfg_degree must be 1 or 2 (one rank per CFG branch), got {self.cfg_degree}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.pipefusion_degree > 1 and self.warmup_steps < 1:
            # A patch step attends to every other patch's K/V from an earlier step; with no whole-latent
            # step first there is no earlier K/V to attend to (zeros would be a different model).
            raise ValueError(f"pipefusion_degree {self.pipefusion_degree} needs warmup_steps >= 1 (a synchronous "
                             f"whole-latent step fills the stale K/V buffers before patches reuse them); "
                             f"set warmup_steps (--warmup-steps) to 1 or more")
        if self.num_patches is not None and self.num_patches < self.pipefusion_degree:
            raise ValueError(f"num_patches {self.num_patches} < pipefusion_degree {self.pipefusion_degree}: every "
                             f"stage needs a patch in flight; set num_patches (--patches) to at least "
                             f"{self.pipefusion_degree}, or leave it unset to use {self.pipefusion_degree}")
        if not isinstance(self.shard_weights, bool):
            raise ValueError(f"shard_weights must be True or False, got {self.shard_weights!r}")
        if self.shard_weights:
            self.check_shardable()
        if self.stage_split:
            self._check_split()

    def _check_split(self) -> None:
        split = tuple(self.stage_split)
        if len(split) != self.pipefusion_degree - 1 or any(b <= a for a, b in zip((0,) + split, split)):
            raise ValueError(f"stage_split {split} must give the first block of each of the {self.pipefusion_degree - 1} "
                             f"PipeFusion stages after the first, increasing from 1 (e.g. (3,) for 2 stages); leave it "
                             f"empty to cut the stages by the blocks' FLOPs")

    def check_shardable(self) -> None:
        """Weight sharding needs more than one rank per PipeFusion stage; ``ValueError`` names the fix."""
        if self.shard_group_size < 2:
            where = (f"each of its {self.pipefusion_degree} PipeFusion stages has 1 rank" if self.pipefusion_degree > 1
                     else "it has 1 rank")
            raise ValueError(f"shard_weights needs more than one rank per PipeFusion stage (the ranks of a stage share "
                             f"its blocks' weights), but {self._degrees()}: {where}; add ranks on ulysses, ring, cfg "
                             f"or data (e.g. ulysses_degree 2), or turn shard_weights (--shard-weights) off")

    def validate_split(self, num_blocks: int) -> None:
        """``ValueError`` when ``stage_split`` starts a stage past the model's ``num_blocks`` blocks."""
        if self.stage_split and self.stage_split[-1] >= num_blocks:
            raise ValueError(f"stage_split {tuple(self.stage_split)} starts a stage at block {self.stage_split[-1]}, but "
                             f"the model has {num_blocks} blocks (0-{num_blocks - 1}); start every stage below "
                             f"{num_blocks}, or leave stage_split empty")

    @property
    def world_size(self) -> int:
        return self.data_degree * self.group_size

    @property
    def group_size(self) -> int:
        """Ranks of one data group (one batch chunk): cfg x pipefusion x ring x ulysses."""
        return self.cfg_degree * self.pipefusion_degree * self.ring_degree * self.ulysses_degree

    @property
    def patches(self) -> int:
        return self.num_patches if self.num_patches is not None else self.pipefusion_degree

    @property
    def sequence_degree(self) -> int:
        """Ranks that split one patch's image tokens: ring x ulysses."""
        return self.ring_degree * self.ulysses_degree

    @property
    def shard_group_size(self) -> int:
        """Ranks that run the same blocks (one PipeFusion stage: data x cfg x ring x ulysses), which share their
        weights with ``shard_weights``."""
        return self.world_size // self.pipefusion_degree

    @property
    def is_serial(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        sharded = f", weights sharded over {self.shard_group_size} ranks" if self.shard_weights else ""
        split = f", stages from blocks {', '.join(map(str, (0,) + tuple(self.stage_split)))}" if self.stage_split else ""
        return self._degrees() + sharded + split

    def _degrees(self) -> str:
        data = f"data {self.data_degree} x " if self.data_degree > 1 else ""
        return (f"{data}cfg {self.cfg_degree} x pipefusion {self.pipefusion_degree} x ring {self.ring_degree} x "
                f"ulysses {self.ulysses_degree} (patches {self.patches})")

    def validate_for(self, world_size: int, num_heads: int, image_tokens: int, cfg: float,
                     num_blocks: int | None = None, batch_size: int | None = None) -> None:
        """Check the fit to a world, a model and a resolution; ``ValueError`` names a working alternative.

        ``image_tokens`` is the packed token count (latent h/2 * w/2, times T frames of a video); ``cfg`` the
        request's guidance scale;
        ``num_blocks`` the model's transformer blocks (PipeFusion stages split them; None skips that check);
        ``batch_size`` the latent's images (each data group needs one; None skips that check).
        """
        if self.world_size != world_size:
            raise ValueError(f"{self.describe()} needs {self.world_size} ranks but the world has {world_size}; "
                             f"choose degrees whose product is {world_size}, "
                             f"{alternative(world_size, num_heads, image_tokens)}")
        if num_heads % self.ulysses_degree:
            raise ValueError(f"ulysses_degree {self.ulysses_degree} does not divide the model's {num_heads} attention "
                             f"heads; use a ulysses degree from {divisors(num_heads)} and put the remaining ranks on "
                             f"ring, {alternative(world_size, num_heads, image_tokens)}")
        if num_blocks is not None and self.pipefusion_degree > num_blocks:
            raise ValueError(f"pipefusion_degree {self.pipefusion_degree} exceeds the model's {num_blocks} transformer "
                             f"blocks (one stage needs at least one block); use pipefusion_degree <= {num_blocks} "
                             f"and give the other ranks to ulysses or ring")
        if num_blocks is not None:
            self.validate_split(num_blocks)
        split = self.sequence_degree * self.patches
        if image_tokens % split:
            fit = suggest(world_size, num_heads, image_tokens)
            per_patch = (f" ({image_tokens} / {self.patches} patches = {image_tokens / self.patches:g} tokens per "
                         f"patch, each split over ring x ulysses = {self.sequence_degree} ranks)"
                         if self.patches > 1 else "")
            raise ValueError(f"{image_tokens} image tokens (latent h/2 * w/2, x frames for a video) do not split "
                             f"evenly into ring "
                             f"{self.ring_degree} x ulysses {self.ulysses_degree} x patches {self.patches} = {split} "
                             f"pieces{per_patch}; choose a width and height whose token count is a multiple of "
                             f"{split}" + (", fewer patches (--patches)" if self.patches > self.pipefusion_degree
                                           else "")
                             + (f", or other degrees, e.g. {fit.describe()}" if fit is not None else ""))
        if batch_size is not None:
            self.check_batch(batch_size)
        if self.cfg_degree == 2 and cfg == 1.0:
            raise ValueError("cfg_degree 2 runs the positive and negative CFG branches on two rank groups, but cfg is "
                             "1.0, where ComfyUI skips the negative branch; set cfg != 1.0 with a negative prompt, "
                             "or drop CFG parallel (--cfg-parallel) and give the ranks to ulysses or ring")

    def check_batch(self, batch_size: int) -> None:
        """Every data group samples at least one image of the batch."""
        if self.data_degree > batch_size:
            raise ValueError(f"data_degree {self.data_degree} needs a batch of at least {self.data_degree} images, "
                             f"the latent has {batch_size}; lower data_degree (--data-degree) or raise batch_size")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest(world_size: int, num_heads: int, image_tokens: int) -> ParallelConfig | None:
    """A sequence-parallel config for ``world_size`` ranks that fits: the most Ulysses the heads allow, the
    rest ring; ``None`` when the token count does not split into ``world_size`` shards at all."""
    if image_tokens % world_size:
        return None
    ulysses = max(d for d in divisors(world_size) if num_heads % d == 0)
    return ParallelConfig(ring_degree=world_size // ulysses, ulysses_degree=ulysses)


def alternative(world_size: int, num_heads: int, image_tokens: int) -> str:
    """The tail of an error message: a config that works, or what to change so that one does."""
    config = suggest(world_size, num_heads, image_tokens)
    if config is None:
        return (f"and a resolution whose token count is a multiple of {world_size} ({image_tokens} tokens do "
                f"not split over {world_size} ranks)")
    return f"e.g. {config.describe()}"
