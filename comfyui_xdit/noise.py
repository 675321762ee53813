"""Initial noise, drawn exactly as ComfyUI's ``comfy.sample.prepare_noise``."""

from __future__ import annotations

import torch


def prepare_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise shaped like ``latent`` from a CPU generator seeded with ``seed``.

    ComfyUI seeds the global CPU generator (``torch.manual_seed``) and draws the whole batch in one
    call; a private generator with the same seed gives the same numbers without touching global state.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
