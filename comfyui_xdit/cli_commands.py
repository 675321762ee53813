"""The commands of ``comfyui-xdit`` (generate, make-tiny, pool status, plan); ``cli.main`` is the entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .conditioning import Conditioning
from .cli import ENVIRONMENT_EXIT
from .environment import ENGINE, POOL, BrokenEnvironment, require_environment
from .input_checks import CLI_INPUTS, check_inputs
from .parallel_config import ParallelConfig
from .plan_command import add_plan_parser, run_plan
from .models.families import TINY_SPECS, family_of, write_random_model
from .models.fp8_weights import UNET_LOADER_CHOICES, weight_dtype_of_choice
from .prediction import prediction_of
from .samplers import check_sampler
from .request import DTYPES, GenerationRequest, ModelRef, SigmaShift
from .samplers import SAMPLER_NAMES
from .sigmas import SCHEDULER_NAMES

logger = logging.getLogger(__name__)

COND_KEYS_DOC = ("--cond FILE.safetensors holds: 'positive_context' (1, L, width) text tokens (Flux and SD3: 4096, "
                 "Qwen-Image: 3584, PixArt: 4096 T5), 'positive_pooled' (1, width) pooled vector where the family has "
                 "one (Flux: 768 CLIP-L, SD3: 2048 CLIP-L+G), optional 'negative_context' (+ 'negative_pooled'; needed "
                 "when cfg != 1), optional 'guidance' (Flux-dev: a 1-element tensor, default 3.5; HunyuanVideo: "
                 "6.0); HunyuanDiT: 'positive_context' "
                 "(1, >= 77, 1024) CLIP tokens and 'positive_second_context' (1, >= 256, 2048) mT5-XL tokens, with "
                 "optional masks 'positive_context_mask' / 'positive_second_context_mask' (1, L) (and the negative_* "
                 "ones); Wan / CogVideoX image-to-video: optional 'positive_concat_latent' (1, 16, T, H, W) "
                 "start-frame latent and "
                 "'positive_concat_mask' (1, 1, T, H, W), as WanImageToVideo sets them, and 'positive_clip_vision' "
                 "(1, 257, 1280) CLIP vision penultimate tokens (and the negative_* ones)")


def default_dtype() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def read_tensors(path: str, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"cannot read the {what} file {path!r}: {exc}") from exc


def read_cond_file(path: str, default_guidance: float = 3.5) -> tuple[Conditioning, Optional[Conditioning]]:
    """The --cond file's conditioning; ``default_guidance`` where it has no 'guidance' (the family's: Flux's 3.5,
    HunyuanVideo's 6.0)."""
    tensors = read_tensors(path, "--cond")
    guidance = float(tensors["guidance"].reshape(-1)[0]) if "guidance" in tensors else default_guidance
    if "positive_context" not in tensors:
        raise ValueError(f"{path!r} lacks 'positive_context'. {COND_KEYS_DOC}")
    if "negative_pooled" in tensors and "negative_context" not in tensors:
        raise ValueError(f"{path!r} has 'negative_pooled' but no 'negative_context'; give the tokens too. "
                         f"{COND_KEYS_DOC}")
    try:  # a missing pooled vector: the family's input check says whether the model needs one
        positive = Conditioning(tensors["positive_context"], tensors.get("positive_pooled"), guidance,
                                **_second_stream(tensors, "positive"))
        negative = None
        if "negative_context" in tensors:
            negative = Conditioning(tensors["negative_context"], tensors.get("negative_pooled"), guidance,
                                    **_second_stream(tensors, "negative"))
    except ValueError as exc:
        raise ValueError(f"{path!r}: {exc}. {COND_KEYS_DOC}") from None
    return positive, negative


def _second_stream(tensors: dict[str, torch.Tensor], side: str) -> dict[str, Optional[torch.Tensor]]:
    """A --cond file's masks and second text stream (HunyuanDiT's mT5) for ``side`` (positive / negative)."""
    return {name: tensors.get(f"{side}_{name}") for name in ("context_mask", "second_context", "second_context_mask",
                                                             "concat_latent", "concat_mask", "clip_vision")}


def build_request(args: argparse.Namespace) -> GenerationRequest:
    from .model_loader import model_spec, tiny_conditioning

    if args.height % 16 or args.width % 16:
        raise ValueError(f"--height and --width must be multiples of 16 for Flux, got {args.height}x{args.width}")
    model = ModelRef(args.model, args.dtype or default_dtype(), weight_dtype=weight_dtype_of_choice(args.weight_dtype))
    if model.is_tiny:
        positive, negative = tiny_conditioning(model, args.seed)
    elif args.cond:
        positive, negative = read_cond_file(args.cond, getattr(model_spec(model), "default_guidance", 3.5))
    else:
        raise ValueError(f"a model file needs --cond FILE.safetensors with the text conditioning. {COND_KEYS_DOC}")
    if args.init_latent:
        latent = read_tensors(args.init_latent, "--init-latent").get("samples")
        if latent is None:
            raise ValueError(f"{args.init_latent!r} has no 'samples' tensor (the layout of ComfyUI's SaveLatent)")
    else:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        frames = latent_frames(args.frames) if args.frames is not None else None
        if frames is None and _makes_video(model):
            raise ValueError(f"{args.model} makes video: pass --frames N (video frames, as EmptyHunyuanLatentVideo's "
                             f"length: 81 frames = 21 latent frames)")
        channels, scale = _latent_layout(model)  # 16 channels at 1/8 (Wan 2.2 TI2V 5B: 48 at 1/16)
        size = (args.height // scale, args.width // scale)
        # (B, C, H, W), or a video's (B, C, T, H, W)
        latent = torch.zeros(args.batch_size, channels, *size) if frames is None else torch.zeros(
            args.batch_size, channels, frames, *size)
    shift = SigmaShift(mode="resolution", max_shift=args.max_shift, base_shift=args.base_shift) \
        if args.resolution_shift else SigmaShift()
    parallel = ParallelConfig(data_degree=args.data_degree, cfg_degree=2 if args.cfg_parallel else 1,
                              pipefusion_degree=args.pipefusion, ring_degree=args.ring, ulysses_degree=args.ulysses,
                              num_patches=args.patches, warmup_steps=args.warmup_steps,
                              shard_weights=args.shard_weights, stage_split=tuple(args.stage_split or ()))
    return GenerationRequest(model=model, latent=latent, positive=positive,
                             negative=negative if args.cfg != 1.0 else None, seed=args.seed, steps=args.steps,
                             cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, denoise=args.denoise,
                             shift=shift, parallel=parallel, start_step=args.start_step, end_step=args.end_step,
                             add_noise=not args.no_add_noise, leftover_noise=args.leftover_noise)


def latent_frames(frames: int) -> int:
    """Latent frames of a ``frames``-frame video, as EmptyHunyuanLatentVideo makes them: (frames - 1) // 4 + 1."""
    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")
    return (frames - 1) // 4 + 1


def _latent_layout(model: ModelRef) -> tuple[int, int]:
    """(channels, VAE downscale) of the empty LATENT for the model: 16 at 1/8 unless its spec says otherwise (Wan 2.2
    TI2V 5B: 48 at 1/16, as Wan22ImageToVideoLatent); a file not on this machine gets the default."""
    from .model_loader import model_spec

    if not (model.is_tiny or os.path.isfile(model.path)):
        return 16, 8
    spec = model_spec(model)
    return (spec.latent_channels if getattr(spec, "video", False) else 16), getattr(spec, "vae_scale", 8)


def _makes_video(model: ModelRef) -> bool:
    """Whether the model (a tiny one, or a file on this machine) takes a video LATENT."""
    from .model_loader import model_spec

    if not (model.is_tiny or os.path.isfile(model.path)):
        return False
    return bool(getattr(model_spec(model), "video", False))


def check_request_fits(request: GenerationRequest) -> None:
    """Refuse inputs and a parallel config that do not fit the model and resolution before any rank starts.
    A model file that is not on this machine (a pool with --models-folder) is checked by the ranks instead."""
    from .model_loader import model_spec

    if not (request.model.is_tiny or os.path.isfile(request.model.path)):
        return
    spec = model_spec(request.model)
    check_inputs(spec, request.latent, request.positive, request.negative, CLI_INPUTS)
    check_sampler(request.sampler, prediction_of(family_of(spec).adapter()))
    if request.parallel.is_serial:
        return
    frames = request.latent.shape[2] if request.latent.ndim == 5 else 1  # (B, C, [T,] H, W)
    frames //= getattr(spec, "patch_t", 1)  # CogVideoX 1.5: 2 latent frames per token
    tokens = frames * (request.latent.shape[-2] // 2) * (request.latent.shape[-1] // 2)
    request.parallel.validate_for(request.parallel.world_size, spec.num_attention_heads, tokens, request.cfg,
                                  num_blocks=spec.num_blocks,
                                  batch_size=request.latent.shape[0])


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample one latent and save it like ComfyUI's SaveLatent",
                       epilog=COND_KEYS_DOC)
    p.add_argument("--model", required=True, help="a .safetensors file of a family we run (README: Model families), or tiny:NAME (make-tiny's names)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--frames", type=int, default=None,
                   help="video frames for a video model (Wan 2.1), as EmptyHunyuanLatentVideo's length: latent frames "
                        "(frames - 1) // 4 + 1")
    p.add_argument("--batch-size", type=int, default=1, help="images of the empty latent (not with --init-latent)")
    p.add_argument("--sampler", default="euler", choices=SAMPLER_NAMES)
    p.add_argument("--scheduler", default="simple", choices=SCHEDULER_NAMES)
    p.add_argument("--denoise", type=float, default=1.0)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--weight-dtype", choices=list(UNET_LOADER_CHOICES), default="default",
                   help="how the ranks store the weights, as UNETLoader's weight_dtype: default keeps an fp8 file's "
                        "Linear weights fp8; fp8_e4m3fn / fp8_e5m2 round every weight to fp8 and keep the Linear "
                        "weights fp8, upcast to --dtype at each layer (fp8_e4m3fn_fast computes as fp8_e4m3fn)")
    p.add_argument("--cond", help="conditioning file for real models")
    p.add_argument("--init-latent", help="a SaveLatent file to start from (image-to-image with --denoise < 1)")
    p.add_argument("--resolution-shift", action="store_true",
                   help="use ModelSamplingFlux's resolution-dependent shift instead of the model default")
    p.add_argument("--max-shift", type=float, default=1.15)
    p.add_argument("--base-shift", type=float, default=0.5)
    split = p.add_argument_group("split", "KSamplerAdvanced's part of the schedule (Wan 2.2's two experts: run the "
                                 "high-noise one with --end-step K --leftover-noise, then the low-noise one with "
                                 "--init-latent (its --out) --start-step K --no-add-noise)")
    split.add_argument("--start-step", type=int, default=0, help="start_at_step: skip the schedule's first steps")
    split.add_argument("--end-step", type=int, default=None, help="end_at_step: stop before this step")
    split.add_argument("--no-add-noise", action="store_true", help="add_noise disabled: start from --init-latent as is")
    split.add_argument("--leftover-noise", action="store_true",
                       help="return_with_leftover_noise: stop at --end-step's sigma instead of denoising fully")
    p.add_argument("--out", required=True, help="output .safetensors (key 'samples')")
    par = p.add_argument_group("parallel", "world size = data x ulysses x ring x pipefusion x (2 with --cfg-parallel); "
                               "without a GPU each rank is a local CPU process")
    par.add_argument("--ulysses", type=int, default=1, help="Ulysses (all-to-all over heads) degree")
    par.add_argument("--ring", type=int, default=1, help="ring attention degree")
    par.add_argument("--pipefusion", type=int, default=1, help="PipeFusion stages")
    par.add_argument("--patches", type=int, default=None, help="PipeFusion patches (default: --pipefusion)")
    par.add_argument("--warmup-steps", type=int, default=1, help="PipeFusion synchronous warm-up steps")
    par.add_argument("--cfg-parallel", action="store_true", help="run the two CFG branches on two rank groups")
    par.add_argument("--data-degree", type=int, default=1,
                     help="batch groups: the images of the batch split over this many rank groups")
    par.add_argument("--stage-split", type=int, nargs="+", default=None, metavar="BLOCK",
                     help="the first block of each PipeFusion stage after the first (default: stages balanced by "
                          "the blocks' FLOPs); benchmarks/parallel_speed.py shows a cut by measured block times")
    par.add_argument("--shard-weights", action="store_true",
                     help="keep 1/N of every block's weights on each of the N ranks of a PipeFusion stage (FSDP2), "
                          "gathering a block's weights just before it runs; needs more than one rank per stage")
    add_pool_options(p)
    p.add_argument("--in-process", action="store_true",
                   help="skip the Ray pool: sample in this process (local processes for parallel configs)")


def add_pool_options(p: argparse.ArgumentParser) -> None:
    pool = p.add_argument_group("pool", "default: an embedded local Ray pool on this machine")
    pool.add_argument("--address", help="join the Ray cluster at HEAD:6379 (started with `ray start --head`)")
    pool.add_argument("--network-interface", help="NIC for gloo/NCCL between hosts (GLOO/NCCL_SOCKET_IFNAME)")
    pool.add_argument("--models-folder", help="where hosts look for a model file by name")
    pool.add_argument("--gpus", default="auto", help="embedded pool: 'auto' (every GPU of this machine), 'all', or "
                      "cuda numbers such as 1,2,3; a cluster chooses on each host")


def run_pool(args: argparse.Namespace) -> int:
    from comfyui_xdit_workers import cli_pool  # lazily: the engine package never imports Ray

    return cli_pool.guarded(cli_pool.status, args)


def run_generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .model_loader import load_model

    request = build_request(args)
    check_request_fits(request)
    if not args.in_process:
        from comfyui_xdit_workers import cli_pool  # lazily: the engine package never imports Ray

        latent = cli_pool.guarded(cli_pool.generate, request, args)
    elif request.parallel.is_serial:
        def report(event) -> None:
            logger.info("step %d/%d", event.step, event.total)

        logger.info("loading %s (%s, weights %s) in this process", request.model.path, request.model.dtype,
                    request.model.weight_dtype)
        engine = Engine(load_model(request.model))
        logger.info("sampling %d steps", request.sampling_steps)
        latent = engine.generate(request, on_step=report)
    else:
        from .parallel.launch import generate_local

        logger.info("sampling on %d local CPU processes: %s", request.parallel.world_size,
                    request.parallel.describe())
        latent = generate_local(request)
    save_file({"samples": latent.contiguous()}, args.out)
    sys.stdout.write(f"wrote {args.out}: samples {tuple(latent.shape)}\n")
    return 0


def run_make_tiny(args: argparse.Namespace) -> int:
    spec = TINY_SPECS[args.name]
    write_random_model(args.out, spec, seed=args.seed, dtype=DTYPES[args.dtype])
    sys.stdout.write(f"wrote {args.out}: random {args.name} in {family_of(spec).title}'s single-file layout\n")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfyui-xdit",
                                     description="generate a latent, write a tiny model file, inspect the pool")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    tiny = sub.add_parser("make-tiny", help="write a deterministic random-weight model file")
    tiny.add_argument("name", choices=list(TINY_SPECS))
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    pool = sub.add_parser("pool", help="the Ray worker pool").add_subparsers(dest="pool_command", required=True)
    add_pool_options(pool.add_parser("status", help="hosts, devices, ranks and their state"))
    add_plan_parser(sub)
    return parser


# Loggers whose INFO lines are the stages a user sees without -v: pool start, model load, steps.
STAGE_LOGGERS = ("comfyui_xdit.cli_commands", "comfyui_xdit_workers.cli_pool", "comfyui_xdit_workers.runtime",
                 "comfyui_xdit_workers.world", "comfyui_xdit_workers.pool")


class StageLines(logging.Handler):
    """``comfyui-xdit: <message>`` on whatever ``sys.stderr`` is when a stage is logged."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("comfyui-xdit: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def report_stages() -> None:
    """One line per stage on stderr; the rest of the logging stays at WARNING. Idempotent."""
    for name in STAGE_LOGGERS:
        stage_logger = logging.getLogger(name)
        stage_logger.setLevel(logging.INFO)
        if not any(isinstance(h, StageLines) for h in stage_logger.handlers):
            stage_logger.addHandler(StageLines())
        stage_logger.propagate = False


PARTS = {"generate": (ENGINE, POOL), "make-tiny": (ENGINE,), "pool": (ENGINE, POOL), "plan": (ENGINE,)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        report_stages()
    handlers = {"generate": run_generate, "make-tiny": run_make_tiny, "pool": run_pool, "plan": run_plan}
    parts = (ENGINE,) if getattr(args, "in_process", False) else PARTS[args.command]
    try:
        require_environment(parts)
        return handlers[args.command](args)
    except BrokenEnvironment as exc:
        sys.stderr.write(f"comfyui-xdit: error: {exc}\n")
        return ENVIRONMENT_EXIT
    except ValueError as exc:
        sys.stderr.write(f"comfyui-xdit: error: {exc}\n")
        return 2
