"""What the sampling loop, CFG, samplers and every parallel engine ask of a model family's adapter.

Tokens are (B, N, C*2*2) in the shared packing (``models/packing.py``); ``image_ids`` are whatever
positions the family needs per token (rows of ``image_ids(h, w)``, cut the same way as the tokens);
``blocks`` are the pipeline-stage units; ``embed`` / ``embed_context`` / ``run_blocks`` / ``head`` are
the forward in pieces (``carried`` / ``carried_like`` / ``resume``: what crosses a PipeFusion stage
boundary), and the returned block state has ``hidden`` (B, N_local, width) and
``encoder_hidden`` (B, L, width) text tokens that every rank holds whole.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..attention import AttentionSeam
from ..conditioning import Conditioning
from ..latent_format import AnyLatentFormat
from ..prediction import Prediction
from ..sigmas import ModelSampling


class Adapter(Protocol):
    family: str
    latent_format: AnyLatentFormat  # process_in / process_out on (B, C, H, W) and ``channels``
    seam: AttentionSeam
    blocks: list[torch.nn.Module]
    spec: Any
    prediction: Prediction  # flow / eps / v: the model's input scaling and x0 from its output (prediction.py)

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    def default_sampling(self) -> ModelSampling: ...

    def check_latent(self, latent: torch.Tensor) -> None: ...

    def pack(self, latent: torch.Tensor) -> torch.Tensor: ...

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor: ...

    def image_ids(self, height: int, width: int) -> torch.Tensor: ...

    def embed(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> Any: ...

    def embed_context(self, image_ids: torch.Tensor, cond: Conditioning, sigma: torch.Tensor) -> Any: ...

    def text_len(self, cond: Conditioning) -> int: ...

    def run_blocks(self, state: Any, start: int, stop: int) -> Any: ...

    def head(self, state: Any) -> torch.Tensor: ...

    def carried(self, state: Any) -> list[torch.Tensor]: ...

    def carried_like(self, block: int, batch: int, tokens: int, cond: Conditioning) -> list[torch.Tensor]: ...

    def resume(self, context: Any, carried: list[torch.Tensor]) -> Any: ...

    def velocity(self, tokens: torch.Tensor, image_ids: torch.Tensor, cond: Conditioning,
                 sigma: torch.Tensor) -> torch.Tensor: ...
