"""CogVideoX weights in diffusers' layout (``transformer/diffusion_pytorch_model.safetensors``, the only files its
users have: ComfyUI has no CogVideoX loader and no single-file layout of its own): the architecture from tensor
shapes, and deterministic random-weight files for the ``tiny:cogvideox*`` models.

The file's names are ``CogVideoXTransformer3DModel``'s own, so nothing is renamed. The variants, told apart by shapes:
- 1.0 (2B, 5B): a 2x2 patch convolution, one latent frame per token; 1.5 (CogVideoX1.5-5B): a linear patch
  embedding over 2 latent frames x 2x2 (``patch_t`` 2), always rotary;
- text-to-video: 16 latent channels in and out; image-to-video: 32 in (the noisy latent's 16, then the start
  image's latent's 16), 16 out. 1.0's 5B-I2V holds a learned position table (``patch_embed.pos_embedding``: 226
  text rows, then 13 x 30 x 45 video rows) besides its rotary; 1.5's I2V an ``ofs`` embedding (added to the
  timestep embedding) instead.
What the shapes do not say:
- the positions of a 1.0 text-to-video file: CogVideoX-2B adds a fixed 3-D sin-cos table to the video tokens,
  CogVideoX-5B rotates q/k by 3-D rotary positions, and the weights are the same kinds in both. diffusers keeps the
  2B table as a buffer it does not save, so a file says "sin-cos" by holding that table (what our tiny 2B-like files
  write) or by the released 2B's width 1920; every other width is read as rotary (the 5B's 3072);
- the sample grid (60 x 90 latent, 49 video frames) and the 226 T5 tokens every CogVideoX 1.0 was trained with (a
  learned table's grid is read from its length: 226 text rows, 13 frames, rows : columns = 2 : 3).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .checkpoint_file import check_shapes, count_blocks

logger = logging.getLogger(__name__)

PATCH = 2  # latent pixels per token side; one latent frame per token (CogVideoX 1.0), two (1.5: ``patch_t``)
MARKER_KEY = "patch_embed.text_proj.weight"  # the T5 projection inside the patch embedding: CogVideoX's alone
POS_TABLE_KEY = "patch_embed.pos_embedding"  # (1, text + sample tokens, width): the 2B's sin-cos table, when saved
TEXT_DIM = 4096  # T5-XXL
MAX_TEXT_LEN = 226  # the pipeline pads every prompt to this many T5 tokens
SAMPLE_HEIGHT, SAMPLE_WIDTH, SAMPLE_FRAMES = 60, 90, 49  # latent rows, columns and video frames of training
TEMPORAL_COMPRESSION = 4  # video frames per latent frame (after the first)
RELEASED_2B_WIDTH = 1920  # CogVideoX-2B: 30 heads of 64
V15_PATCH_T = 2  # CogVideoX 1.5: latent frames per token
# CogVideoX 1.5's sample grid as its config sets it (latent rows, columns, video frames): its rotary positions are
# plain indices, so this only bounds the grid diffusers' pipeline builds them for
V15_SAMPLE = (300, 300, 81)
OFS_KEY = "ofs_embedding.linear_1.weight"  # CogVideoX 1.5 I2V's offset embedding
LEARNED_FRAMES = (SAMPLE_FRAMES - 1) // TEMPORAL_COMPRESSION + 1  # a learned table's latent frames: 13
_BLOCK_KEY = re.compile(r"transformer_blocks\.(\d+)\.")
_REQUIRED = ("patch_embed.proj.weight", MARKER_KEY, "time_embedding.linear_1.weight",
             "transformer_blocks.0.attn1.norm_q.weight", "transformer_blocks.0.ff.net.0.proj.weight",
             "norm_final.weight", "proj_out.weight")


@dataclass(frozen=True)
class CogVideoXSpec:
    """The architecture of one CogVideoX transformer (2B: 30 heads of 64, 30 blocks, sin-cos positions;
    5B, 5B-I2V, 1.5-5B, 1.5-5B-I2V: 48 heads of 64, 42 blocks, rotary)."""

    num_layers: int
    num_heads: int = 30
    head_dim: int = 64
    time_embed_dim: int = 512
    text_dim: int = TEXT_DIM
    in_channels: int = 16
    out_channels: int = 16
    rotary: bool = False  # True: 3-D rotary positions (5B); False: the 3-D sin-cos table (2B)
    max_text_len: int = MAX_TEXT_LEN
    family: str = "cogvideox"
    video: bool = True  # the LATENT carries frames: (B, C, T, H, W)
    patch_t: int = 1  # latent frames per token: 1 (1.0, a patch convolution), 2 (1.5, a linear patch embedding)
    patch_bias: bool = True  # 1.0's patch convolution's bias (diffusers' patch_bias; 1.5's linear always has one)
    ofs: bool = False  # 1.5 I2V: an offset embedding (ofs_embed_dim = time_embed_dim) added to the timestep's
    learned_positions: bool = False  # 1.0 5B-I2V: a saved position table over text + the sample grid's video tokens
    sample_height: int = SAMPLE_HEIGHT  # latent rows / columns / video frames of training (a learned table's grid)
    sample_width: int = SAMPLE_WIDTH
    sample_frames: int = SAMPLE_FRAMES

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    @property
    def context_dim(self) -> int:
        return self.text_dim

    @property
    def pooled_dim(self) -> int:
        """CogVideoX takes no pooled vector: width 0."""
        return 0

    @property
    def latent_channels(self) -> int:
        """The LATENT's channels (an image-to-video model takes as many again: the start image's latent)."""
        return self.out_channels

    @property
    def extra_channels(self) -> int:
        """Channels the model takes after the noisy latent's: the start image's latent (I2V), else 0."""
        return self.in_channels - self.out_channels

    @property
    def image_conditioning(self) -> bool:
        """Image-to-video: the conditioning's start-frame latent (``concat_latent``) is concatenated on channels."""
        return self.extra_channels > 0

    @property
    def pads_start_frames(self) -> bool:
        """A start latent of fewer frames than the LATENT (the start image's one) gets zero frames after it, as the
        pipelines' ``image_latents``."""
        return self.image_conditioning

    @property
    def image_dim(self) -> Optional[int]:
        """No CLIP vision tokens (Wan 2.1 I2V's): CogVideoX takes the start image as a latent only."""
        return None

    @property
    def token_values(self) -> int:
        """Values per packed token in and out: C x patch_t x 2 x 2."""
        return self.out_channels * self.patch_t * PATCH * PATCH

    @property
    def sample_tokens(self) -> int:
        """Video tokens of the sample grid (the rows of a learned table after the text's)."""
        frames = (self.sample_frames - 1) // TEMPORAL_COMPRESSION + 1
        return frames // self.patch_t * (self.sample_height // PATCH) * (self.sample_width // PATCH)

    @property
    def rotary_axes(self) -> tuple[int, int, int]:
        """Rotary widths of a head per axis (frame, row, column), as CogVideoX splits it: (16, 24, 24) for 64."""
        side = self.head_dim // 8 * 3
        return self.head_dim // 4, side, side

    def diffusers_config(self) -> dict:
        return dict(num_attention_heads=self.num_heads, attention_head_dim=self.head_dim,
                    in_channels=self.in_channels, out_channels=self.out_channels, time_embed_dim=self.time_embed_dim,
                    ofs_embed_dim=self.time_embed_dim if self.ofs else None,
                    text_embed_dim=self.text_dim, num_layers=self.num_layers, sample_width=self.sample_width,
                    sample_height=self.sample_height, sample_frames=self.sample_frames, patch_size=PATCH,
                    patch_size_t=None if self.patch_t == 1 else self.patch_t, patch_bias=self.patch_bias,
                    temporal_compression_ratio=TEMPORAL_COMPRESSION, max_text_seq_length=self.max_text_len,
                    use_rotary_positional_embeddings=self.rotary,
                    use_learned_positional_embeddings=self.learned_positions)


# 4 heads of 32 (Ulysses up to 4; the rotary axes 8 + 12 + 12), 4 blocks (PipeFusion up to 4 stages), T5-XXL width.
TINY_COGVIDEOX = CogVideoXSpec(num_layers=4, num_heads=4, head_dim=32, time_embed_dim=64, rotary=True)
TINY_COGVIDEOX_2B = CogVideoXSpec(num_layers=4, num_heads=4, head_dim=32, time_embed_dim=64, rotary=False)
# The released models' shapes (memory tables and tests; never built with real weights here).
COGVIDEOX_2B = CogVideoXSpec(num_layers=30, num_heads=30, head_dim=64, rotary=False)
COGVIDEOX_5B = CogVideoXSpec(num_layers=42, num_heads=48, head_dim=64, rotary=True)
COGVIDEOX_5B_I2V = CogVideoXSpec(num_layers=42, num_heads=48, head_dim=64, rotary=True, in_channels=32,
                                 learned_positions=True)
COGVIDEOX15_5B = CogVideoXSpec(num_layers=42, num_heads=48, head_dim=64, rotary=True, patch_t=V15_PATCH_T,
                               sample_height=V15_SAMPLE[0], sample_width=V15_SAMPLE[1],
                               sample_frames=V15_SAMPLE[2])
COGVIDEOX15_5B_I2V = dataclasses.replace(COGVIDEOX15_5B, in_channels=32, ofs=True)
# The tiny 1.5s: TINY_COGVIDEOX's sizes with 1.5's patching (and I2V's 32 channels + ofs); the tiny 1.0 I2V: a learned
# table over 226 text tokens and a 13-frame 8 x 12 latent (312 video tokens), the only grid it takes
TINY_COGVIDEOX15 = dataclasses.replace(TINY_COGVIDEOX, patch_t=V15_PATCH_T,
                                       sample_height=V15_SAMPLE[0], sample_width=V15_SAMPLE[1],
                                       sample_frames=V15_SAMPLE[2])
TINY_COGVIDEOX15_I2V = dataclasses.replace(TINY_COGVIDEOX15, in_channels=32, ofs=True)
TINY_COGVIDEOX_I2V = dataclasses.replace(TINY_COGVIDEOX, in_channels=32, learned_positions=True, sample_height=8,
                                         sample_width=12)
NAMED_COGVIDEOX_SPECS: Mapping[str, CogVideoXSpec] = {"cogvideox": TINY_COGVIDEOX, "cogvideox-2b": TINY_COGVIDEOX_2B,
                                                      "cogvideox15": TINY_COGVIDEOX15,
                                                      "cogvideox15-i2v": TINY_COGVIDEOX15_I2V,
                                                      "cogvideox-i2v": TINY_COGVIDEOX_I2V}


def block_index(key: str, spec: CogVideoXSpec) -> Optional[int]:
    """The block a key belongs to; ``None`` for the tensors every stage needs."""
    match = _BLOCK_KEY.match(key)
    return int(match.group(1)) if match else None


def _refuse_variants(state: Mapping[str, torch.Tensor], source: str) -> None:
    if "time_embedding.linear_1.weight" not in state and MARKER_KEY in state:
        raise ValueError(f"{source} has a T5 projection in its patch embedding but no CogVideoX timestep embedding "
                         f"(a CogView3/CogView4 transformer?), which the xDiT nodes do not run; use a CogVideoX "
                         f"transformer (CogVideoX-2b / -5b / -5b-I2V, CogVideoX1.5-5B / -5B-I2V)")


def _patching(state: Mapping[str, torch.Tensor], source: str) -> tuple[int, int, int]:
    """(patch_t, in_channels, out_channels) from the patch embedding and the output projection."""
    proj, out = state["patch_embed.proj.weight"].shape, state["proj_out.weight"].shape
    patch_t = V15_PATCH_T if len(proj) == 2 else 1  # 1.5: a linear map of (C, 2, 2, 2) patches
    values = patch_t * PATCH * PATCH
    in_channels = int(proj[1]) // values if patch_t > 1 else int(proj[1])
    out_channels = int(out[0]) // values
    if in_channels not in (out_channels, 2 * out_channels) or int(out[0]) % values or (
            patch_t > 1 and int(proj[1]) % values):
        raise ValueError(f"{source}: a CogVideoX patch embedding of shape {tuple(proj)} and output projection "
                         f"{tuple(out)} take {in_channels} channels in and give {out_channels} out; CogVideoX takes "
                         f"as many in as out (text-to-video) or twice as many (image-to-video)")
    return patch_t, in_channels, out_channels


def learned_grid(rows: int, source: str = "checkpoint") -> tuple[int, int]:
    """(sample_height, sample_width) latent of a learned position table with ``rows`` rows: 226 text rows, then 13
    frames of a rows : columns = 2 : 3 token grid (CogVideoX-5B-I2V: 226 + 13 x 30 x 45)."""
    per_frame, rest = divmod(rows - MAX_TEXT_LEN, LEARNED_FRAMES)
    side = math.isqrt(max(per_frame, 0) // 6)  # token rows = 2 side, columns = 3 side
    if rest or per_frame <= 0 or 6 * side * side != per_frame:
        raise ValueError(f"{source}: a learned CogVideoX position table of {rows} rows is not {MAX_TEXT_LEN} text rows "
                         f"and {LEARNED_FRAMES} frames of a 2 : 3 token grid (CogVideoX-5B-I2V's 226 + 13 x 30 x 45)")
    return 2 * side * PATCH, 3 * side * PATCH


def infer_cogvideox_spec(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> CogVideoXSpec:
    """Architecture from tensor shapes (``state`` may hold shapes only); ``ValueError`` naming what is off."""
    _refuse_variants(state, source)
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        shard = "" if "patch_embed.proj.weight" not in state else (
            "; a diffusers transformer in several files is read from all of them when they keep diffusers' names "
            "(diffusion_pytorch_model-00001-of-00002.safetensors, ...) side by side: this file holds only part of one")
        raise ValueError(f"{source} is not a whole CogVideoX transformer in diffusers' layout: missing "
                         f"{', '.join(missing)}{shard}")
    hidden = int(state["patch_embed.proj.weight"].shape[0])
    head_dim = int(state["transformer_blocks.0.attn1.norm_q.weight"].shape[0])
    if hidden % head_dim or head_dim % 16:
        raise ValueError(f"{source}: CogVideoX width {hidden} with heads of {head_dim} does not split into whole "
                         f"heads whose width is a multiple of 16 (the 3-D positions need it)")
    layers = count_blocks(state, _BLOCK_KEY)
    patch_t, in_channels, out_channels = _patching(state, source)
    image_to_video = in_channels > out_channels
    # a table in an image-to-video 1.0 file is the 5B-I2V's learned one (with rotary); in a text-to-video one the
    # 2B's sin-cos table; 1.5 is always rotary
    learned = POS_TABLE_KEY in state and image_to_video and patch_t == 1
    rotary = patch_t > 1 or learned or (POS_TABLE_KEY not in state and hidden != RELEASED_2B_WIDTH)
    if patch_t > 1:
        grid = dict(sample_height=V15_SAMPLE[0], sample_width=V15_SAMPLE[1], sample_frames=V15_SAMPLE[2])
    elif learned:
        height, width = learned_grid(int(state[POS_TABLE_KEY].shape[1]), source)
        grid = dict(sample_height=height, sample_width=width)
    else:
        grid = {}
    spec = CogVideoXSpec(num_layers=layers, num_heads=hidden // head_dim, head_dim=head_dim,
                         time_embed_dim=int(state["time_embedding.linear_1.weight"].shape[0]),
                         text_dim=int(state[MARKER_KEY].shape[1]), in_channels=in_channels, out_channels=out_channels,
                         rotary=rotary, patch_t=patch_t,
                         patch_bias="patch_embed.proj.bias" in state or patch_t > 1,
                         ofs=OFS_KEY in state, learned_positions=learned, **grid)
    check_shapes(state, cogvideox_shapes(spec), source,
                 f"CogVideoX{' 1.5' if patch_t > 1 else ''}{' I2V' if image_to_video else ''} "
                 f"({spec.num_heads} heads of {head_dim}, {layers} blocks)")
    return spec


def cogvideox_shapes(spec: CogVideoXSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of a CogVideoX transformer with its shape, in diffusers' names."""
    h, t = spec.hidden_size, spec.time_embed_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    def norm(name: str, width: int) -> None:
        shapes[f"{name}.weight"] = (width,)
        shapes[f"{name}.bias"] = (width,)

    if spec.patch_t == 1:
        shapes["patch_embed.proj.weight"] = (h, spec.in_channels, PATCH, PATCH)
    else:  # 1.5: (C, patch_t, 2, 2) values per token, linearly
        shapes["patch_embed.proj.weight"] = (h, spec.in_channels * spec.patch_t * PATCH * PATCH)
    if spec.patch_bias or spec.patch_t > 1:
        shapes["patch_embed.proj.bias"] = (h,)
    if spec.learned_positions:
        shapes[POS_TABLE_KEY] = (1, spec.max_text_len + spec.sample_tokens, h)
    linear("patch_embed.text_proj", h, spec.text_dim)
    linear("time_embedding.linear_1", t, h)
    linear("time_embedding.linear_2", t, t)
    if spec.ofs:
        linear("ofs_embedding.linear_1", t, t)
        linear("ofs_embedding.linear_2", t, t)
    for i in range(spec.num_layers):
        p = f"transformer_blocks.{i}"
        for n in ("norm1", "norm2"):
            linear(f"{p}.{n}.linear", 6 * h, t)
            norm(f"{p}.{n}.norm", h)
        norm(f"{p}.attn1.norm_q", spec.head_dim)
        norm(f"{p}.attn1.norm_k", spec.head_dim)
        for n in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(f"{p}.attn1.{n}", h, h)
        linear(f"{p}.ff.net.0.proj", 4 * h, h)
        linear(f"{p}.ff.net.2", h, 4 * h)
    norm("norm_final", h)
    linear("norm_out.linear", 2 * h, t)
    norm("norm_out.norm", h)
    linear("proj_out", spec.token_values, h)
    return shapes


def cogvideox_to_diffusers(state: Mapping[str, torch.Tensor], spec: CogVideoXSpec) -> dict[str, torch.Tensor]:
    """The file's tensors the transformer loads (the names are already diffusers'); a saved sin-cos table is
    dropped (diffusers rebuilds it, we compute it per token) and anything else unknown with a warning (a learned
    table is the model's own and kept)."""
    known = cogvideox_shapes(spec)
    extra = sorted(set(state) - set(known) - {POS_TABLE_KEY})
    if extra:
        logger.warning("ignoring %d tensors that CogVideoX does not use: %s", len(extra), ", ".join(extra[:5]))
    return {k: v for k, v in state.items() if k in known}


def sincos_1d(width: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) float32 positions -> (N, width) float64 [sin, cos] of position x 10000^(-i / (width/2)), as
    diffusers' 1-D sin-cos embedding (float64 frequencies)."""
    omega = torch.arange(width // 2, dtype=torch.float64) / (width / 2.0)
    omega = 1.0 / 10000 ** omega  # (width / 2,)
    angles = torch.outer(positions.to(torch.float64), omega)  # (N, width / 2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


SPATIAL_INTERPOLATION = 1.875  # CogVideoX's spatial_interpolation_scale (temporal: 1.0)


def sincos_positions(grid: torch.Tensor, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """CogVideoX-2B's fixed position embedding of tokens at ``grid`` (N, 3) (frame, row, column) -> (N, width)
    in ``dtype``: [frame (width/4), column (3 width/8), row (3 width/8)], the spatial positions divided by 1.875 in
    float32 and the sin-cos in float64 as diffusers' ``get_3d_sincos_pos_embed``, then cast. Each axis's rows are
    computed once per distinct position and gathered (a 2B video has 17550 tokens of width 1920)."""
    spatial = 3 * width // 4
    parts = []
    for axis, axis_width, scale in ((0, width // 4, 1.0), (2, spatial // 2, SPATIAL_INTERPOLATION),
                                    (1, spatial // 2, SPATIAL_INTERPOLATION)):
        values, inverse = torch.unique(grid[:, axis], return_inverse=True)
        table = sincos_1d(axis_width, values.float() / scale).to(dtype)  # (distinct positions, axis_width)
        parts.append(table[inverse])  # (N, axis_width)
    return torch.cat(parts, dim=1)


def token_grid(frames: int, rows: int, cols: int) -> torch.Tensor:
    """(frames * rows * cols, 3) int64 (frame, row, column) per token, frame-major then row-major."""
    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"),
                       dim=-1)  # (T, rows, cols, 3)
    return grid.reshape(frames * rows * cols, 3)


def sample_pos_table(spec: CogVideoXSpec) -> torch.Tensor:
    """(1, text + sample tokens, width): the 2B's table at the training grid as diffusers builds it (zeros for
    the text tokens), what a file holds to say its positions are sin-cos."""
    frames, rows, cols = (SAMPLE_FRAMES - 1) // TEMPORAL_COMPRESSION + 1, SAMPLE_HEIGHT // PATCH, SAMPLE_WIDTH // PATCH
    width, spatial = spec.hidden_size, 3 * spec.hidden_size // 4
    # per axis over its whole range, gathered by token (no data-dependent ops: block sizes build this on meta)
    axes = (sincos_1d(width // 4, torch.arange(frames).float()),
            sincos_1d(spatial // 2, torch.arange(cols).float() / SPATIAL_INTERPOLATION),
            sincos_1d(spatial // 2, torch.arange(rows).float() / SPATIAL_INTERPOLATION))
    grid = token_grid(frames, rows, cols)  # (N, 3) frame, row, column
    table = torch.cat([axes[0][grid[:, 0]], axes[1][grid[:, 2]], axes[2][grid[:, 1]]], dim=1)  # (N, width)
    return torch.cat([table.new_zeros(spec.max_text_len, spec.hidden_size), table])[None]


def random_cogvideox_state(spec: CogVideoXSpec, seed: int,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights in diffusers' CogVideoX layout, scaled so activations stay O(1); a sin-cos
    spec's file also holds its position table (so the file says which positions it uses)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(cogvideox_shapes(spec).items()):
        if name == POS_TABLE_KEY:  # a learned table (1.0 I2V): O(1) rows, as the trained one
            tensor = 0.5 * torch.randn(shape, generator=generator)
        elif name.endswith(".norm.weight") or "norm_q" in name or "norm_k" in name or name == "norm_final.weight":
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)  # norm gains
        elif name.endswith(("norm1.linear.weight", "norm2.linear.weight", "norm_out.linear.weight")):
            tensor = torch.randn(shape, generator=generator) / (4 * math.sqrt(shape[1]))  # gentle modulation
        elif name.endswith(".bias"):
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:  # (out, in, ...) weights: 1 / sqrt(fan-in)
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            tensor = torch.randn(shape, generator=generator) / fan_in ** 0.5
        state[name] = tensor.to(dtype).contiguous()
    if not spec.rotary and not spec.learned_positions:
        state[POS_TABLE_KEY] = sample_pos_table(spec).to(dtype).contiguous()
    return state
