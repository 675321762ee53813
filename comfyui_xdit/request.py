"""The request that nodes and the CLI build and that crosses into the workers (small when pickled)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .conditioning import Conditioning
from .models.fp8_weights import WEIGHT_STORAGE
from .parallel_config import ParallelConfig
from .resume import Checkpoint
from .samplers import SAMPLER_NAMES
from .sigmas import SCHEDULER_NAMES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY_PREFIX = "tiny:"
IN_MEMORY_PREFIX = "comfyui-model:"  # weights a ComfyUI MODEL holds, handed to the pool in process


@dataclass(frozen=True)
class ModelRef:
    """Which weights to run: a ``.safetensors`` path or ``tiny:<family>``, the compute dtype, and how the
    weights are stored (``weight_dtype``, models/fp8_weights.py: ``default`` keeps a file's fp8 Linear weights
    fp8 and holds the rest in the compute dtype; ``fp8_e4m3fn`` / ``fp8_e5m2`` round every tensor to that
    fp8 dtype first, as ComfyUI's UNETLoader does). All four fields are the model's identity."""

    path: str
    dtype: str = "fp32"
    patches: str = ""  # digest of the LoRA patches merged on the ranks ("" = none)
    weight_dtype: str = "default"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.weight_dtype not in WEIGHT_STORAGE:
            raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_STORAGE)}, got {self.weight_dtype!r} "
                             f"(fp8_e4m3fn_fast computes as fp8_e4m3fn here)")

    @property
    def identity(self) -> tuple[str, str, str, str]:
        """What the ranks cache a loaded model by: every field."""
        return self.path, self.dtype, self.patches, self.weight_dtype

    @property
    def is_tiny(self) -> bool:
        return self.path.startswith(TINY_PREFIX)

    @property
    def is_in_memory(self) -> bool:
        """Weights of a ComfyUI MODEL (XDiTParallelModel): the pool holds them, no file to read."""
        return self.path.startswith(IN_MEMORY_PREFIX)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


SHIFT_MODES = ("default", "resolution", "flux", "discrete_flow", "discrete")
DISCRETE_PREDICTIONS = ("eps", "v")  # ModelSamplingDiscrete's samplings that xDiT runs (its eps / v_prediction)


@dataclass(frozen=True)
class SigmaShift:
    """Which model sampling: the model's own default, ComfyUI's ModelSamplingFlux node (``resolution``), or
    the one a ComfyUI MODEL carries: ``flux`` (ModelSamplingFlux's ``shift``), ``discrete_flow``
    (ModelSamplingDiscreteFlow's ``shift`` and ``multiplier``) or ``discrete`` (ModelSamplingDiscrete's
    patch of a discrete-schedule model: its ``prediction``, eps or v, which then replaces the model's own,
    and ``zsnr``, the schedule rescaled to zero terminal SNR)."""

    mode: str = "default"
    max_shift: float = 1.15
    base_shift: float = 0.5
    width: Optional[int] = None  # image pixels; None = the latent's size * 8
    height: Optional[int] = None
    shift: float = 1.15  # modes flux / discrete_flow
    multiplier: float = 1.0  # mode discrete_flow
    prediction: str = "eps"  # mode discrete: what the model predicts for this run
    zsnr: bool = False  # mode discrete

    def __post_init__(self) -> None:
        if self.mode not in SHIFT_MODES:
            raise ValueError(f"sigma shift mode must be one of {', '.join(repr(m) for m in SHIFT_MODES)}, "
                             f"got {self.mode!r}")
        if self.mode == "discrete" and self.prediction not in DISCRETE_PREDICTIONS:
            raise ValueError(f"a discrete model sampling predicts one of {', '.join(DISCRETE_PREDICTIONS)}, "
                             f"got {self.prediction!r}")


def check_custom_sigmas(sigmas: torch.Tensor) -> None:
    """A SIGMAS input we can sample: one dimension, at least two finite values, none negative."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 values (what BasicScheduler or SplitSigmas "
                         f"give), got {shape}; connect a SIGMAS output or leave the input empty")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError(f"sigmas must be finite and not negative, got {sigmas.tolist()[:8]}; check the node that "
                         f"makes them")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one sampling run needs, as plain data (no ComfyUI objects, no weights).

    ``latent`` is in ComfyUI's LATENT layout (B, C, H, W), all zeros for text-to-image. ``sigmas``
    (ComfyUI's SIGMAS, e.g. from BasicScheduler or SplitSigmas) replaces ``steps``, ``scheduler``,
    ``denoise`` and ``shift``, as SamplerCustom does.
    """

    model: ModelRef
    latent: torch.Tensor
    positive: Conditioning
    negative: Optional[Conditioning] = None
    seed: int = 0
    steps: int = 20
    cfg: float = 1.0
    sampler: str = "euler"
    scheduler: str = "simple"
    denoise: float = 1.0
    shift: SigmaShift = field(default_factory=SigmaShift)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sigmas: Optional[torch.Tensor] = None  # (steps + 1,) a custom schedule, or None for steps/scheduler
    noise_mask: Optional[torch.Tensor] = None  # (..., h, w) the LATENT's noise_mask: 1 = denoise, 0 = keep
    batch_index: Optional[tuple[int, ...]] = None  # the LATENT's batch_index: which noise draw each image takes
    # KSamplerAdvanced's split of the schedule (Wan 2.2's two experts, a refiner): start_at_step, end_at_step
    # (None = to the end), add_noise, return_with_leftover_noise (False = the last sigma forced to 0 when the
    # run ends before the schedule does, as its force_full_denoise); see sigmas.step_range
    start_step: int = 0
    end_step: Optional[int] = None
    add_noise: bool = True
    leftover_noise: bool = False
    # resume.py: ``checkpoints`` asks the loop for a Checkpoint with every step event, ``resume``
    # continues a run from one (the pool's retry after a lost worker), equal to the uninterrupted run
    checkpoints: bool = False
    resume: Optional[Checkpoint] = None
    # PipeFusion: the checkpoints hold every rank's stale K/V (exact resume); False: they hold the tokens and the
    # history only, and a resumed run re-warms (the pool's choice when the K/V is too big to keep)
    checkpoint_kv: bool = True

    def __post_init__(self) -> None:
        if self.sigmas is not None:
            check_custom_sigmas(self.sigmas)
        if self.noise_mask is not None and (self.noise_mask.dim() < 2 or self.noise_mask.numel() == 0):
            raise ValueError(f"noise_mask must be a (..., height, width) mask, got shape {tuple(self.noise_mask.shape)}; "
                             f"make it with SetLatentNoiseMask")
        if self.batch_index is not None and (len(self.batch_index) != self.latent.shape[0]
                                             or any(int(i) < 0 for i in self.batch_index)):
            raise ValueError(f"batch_index {list(self.batch_index)} must give one index >= 0 per image of the "
                             f"batch of {self.latent.shape[0]}; it comes from LatentFromBatch / RepeatLatentBatch")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.start_step < 0 or (self.end_step is not None and self.end_step < 0):
            raise ValueError(f"start_at_step / end_at_step must be >= 0, got {self.start_step} / {self.end_step}")
        if not 0.0 <= self.denoise <= 1.0:
            raise ValueError(f"denoise must be within [0, 1], got {self.denoise}")
        if self.cfg != 1.0 and self.negative is None:
            raise ValueError(f"cfg {self.cfg} needs a negative conditioning; pass one or set cfg to 1.0")

    @property
    def sampling_steps(self) -> int:
        """The sampler steps this request takes: ``steps``, or one per interval of custom ``sigmas``, cut to
        ``[start_step, end_step)`` (0 when that range is empty: the latent comes back as given)."""
        total = self.steps if self.sigmas is None else len(self.sigmas) - 1
        stop = total if self.end_step is None else min(self.end_step, total)
        return max(0, stop - self.start_step)

    @property
    def uses_cfg(self) -> bool:
        """ComfyUI skips the unconditional branch entirely at cfg == 1."""
        return self.cfg != 1.0
