"""Initial noise, drawn exactly as ComfyUI's ``comfy.sample.prepare_noise``."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def prepare_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian noise shaped like ``latent`` from a CPU generator seeded with ``seed``.

    ComfyUI seeds the global CPU generator (``torch.manual_seed``) and draws the whole batch in one
    call; a private generator with the same seed gives the same numbers without touching global state.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")


def prepare_batch_noise(latent: torch.Tensor, seed: int, batch_index: Optional[Sequence[int]]) -> torch.Tensor:
    """``prepare_noise`` for a latent that carries ``batch_index`` (LatentFromBatch, RepeatLatentBatch): as
    ComfyUI, one (1, C, H, W) draw per index up to the largest, each image taking the draw of its index."""
    if batch_index is None:
        return prepare_noise(latent, seed)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    draws = [torch.randn([1, *latent.shape[1:]], dtype=latent.dtype, layout=latent.layout, generator=generator,
                         device="cpu") for _ in range(max(batch_index) + 1)]
    return torch.cat([draws[i] for i in batch_index], dim=0)  # (B, C, H, W)


def inpaint_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The separate noise ComfyUI's ``ddim`` re-noises the kept latent with (its random inpaint option)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed + 1)
    return torch.randn(list(shape), generator=generator, device="cpu")


class AncestralNoise:
    """ComfyUI's ``default_noise_sampler`` for one run: a generator on the model's device seeded with the
    job's seed, one draw shaped like the whole LATENT (B, C, H, W) for each step that asks, packed like
    the tokens. Patches of one step (PipeFusion) share that step's draw; steps must ask in order."""

    def __init__(self, seed: int, latent_shape: Sequence[int], pack: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.shape, self.pack, self.device = list(latent_shape), pack, device
        self._step: Optional[int] = None
        self._noise: Optional[torch.Tensor] = None

    def __call__(self, step: int) -> torch.Tensor:
        if self._step != step:
            if self._step is not None and step < self._step:
                raise RuntimeError(f"noise for step {step} asked after step {self._step}; steps must ask in order")
            drawn = torch.randn(self.shape, dtype=torch.float32, device=self.device, generator=self.generator)
            self._step, self._noise = step, self.pack(drawn)  # (B, C, H, W) -> (B, N, C * 4)
        return self._noise

    def get_state(self) -> torch.Tensor:
        """The generator's state after the draws so far (a resumed run continues from it)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Continue from ``get_state``'s result: the next step that asks draws what it would have drawn."""
        self.generator.set_state(state)
        self._step, self._noise = None, None


class BrownianNoise:
    """ComfyUI's ``BrownianTreeNoiseSampler`` as its SDE samplers build it (tree on the CPU, seeded with the
    job's seed, spanning the schedule's smallest positive to largest sigma): model call ``k``'s noise is
    the tree's increment over ``noise_spans[k]`` (a one-call sampler's step interval ``sigmas[k]`` to
    ``sigmas[k + 1]``), scaled to unit variance, then packed. The tree answers any interval the same
    way, so patches of a call share one query. ``tree_on_device`` (the ``_gpu`` samplers): the tree lives
    and is queried on ``device``, as ComfyUI's ``cpu=False`` tree does on the model's device."""

    def __init__(self, seed: int, latent_shape: Sequence[int], pack: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device, span: torch.Tensor, noise_spans: torch.Tensor,
                 tree_on_device: bool = False) -> None:
        try:
            import torchsde  # ComfyUI's own requirement; only SDE samplers need it
        except ImportError as exc:
            raise RuntimeError(f"the SDE samplers need torchsde, which ComfyUI's requirements include ({exc}); "
                               f"install it with `python -m pip install torchsde` in this environment, or pick a "
                               f"sampler without _sde") from exc

        low, high = span[span > 0].min(), span.max()
        self.tree_device = torch.device(device) if tree_on_device else torch.device("cpu")
        self.tree = torchsde.BrownianTree(low.detach().to(self.tree_device),
                                          torch.zeros(list(latent_shape), device=self.tree_device),
                                          high.detach().to(self.tree_device), entropy=seed)
        self.noise_spans, self.pack, self.device = noise_spans, pack, device  # (calls, 2)
        self._step: Optional[int] = None
        self._noise: Optional[torch.Tensor] = None

    def __call__(self, step: int) -> torch.Tensor:
        if self._step != step:
            sigma, sigma_next = self.noise_spans[step].to(self.tree_device)
            low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
            increment = torch.stack([self.tree(low.float(), high.float())]).to(self.device) * sign
            noise = increment[0] / (sigma_next - sigma).abs().sqrt().to(self.device)  # (B, C, H, W)
            self._step, self._noise = step, self.pack(noise)
        return self._noise


class BatchRows:
    """Rows ``[start, stop)`` of a whole-batch step noise (``AncestralNoise`` / ``BrownianNoise``): a data
    group draws the whole batch's noise, as ComfyUI does, and steps only its images."""

    def __init__(self, noise: Callable[[int], torch.Tensor], start: int, stop: int) -> None:
        self.noise, self.start, self.stop = noise, start, stop

    def __call__(self, step: int) -> torch.Tensor:
        return self.noise(step)[self.start:self.stop]  # (B, N, C) -> (stop - start, N, C)

    def get_state(self) -> Optional[torch.Tensor]:
        return self.noise.get_state() if hasattr(self.noise, "get_state") else None

    def set_state(self, state: torch.Tensor) -> None:
        self.noise.set_state(state)
