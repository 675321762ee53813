"""How one engine is spread over ranks: cfg x pipefusion x ring x ulysses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each parallel axis; their product is the engine's world size.

    ``num_patches`` (PipeFusion's M) defaults to ``pipefusion_degree``; ``warmup_steps`` are the
    synchronous full steps PipeFusion runs before it starts reusing one-step-stale K/V.
    """

    cfg_degree: int = 1
    pipefusion_degree: int = 1
    ring_degree: int = 1
    ulysses_degree: int = 1
    num_patches: int | None = None
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("cfg_degree", "pipefusion_degree", "ring_degree", "ulysses_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"cfg_degree must be 1 or 2 (one rank per CFG branch), got {self.cfg_degree}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.pipefusion_degree * self.ring_degree * self.ulysses_degree

    @property
    def patches(self) -> int:
        return self.num_patches if self.num_patches is not None else self.pipefusion_degree

    @property
    def is_serial(self) -> bool:
        return self.world_size == 1
