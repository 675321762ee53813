"""How a rank gets its weights: its own disk when it has the file, else tensors via Ray's object store.

Resolution on a worker host: the exact path, then the host's models folder (``$COMFYUI_XDIT_MODELS_FOLDER``
set before ``ray start`` on that host, else the pool's ``models_folder``) by file name. A host with
``COMFYUI_XDIT_NO_LOCAL_WEIGHTS=1`` never reads model files and always receives tensors. The ComfyUI
machine reads the file once and ``ray.put``s it: the whole state dict, or with PipeFusion one object
per stage holding the shared tensors and only that stage's blocks. Either way a PipeFusion rank builds
only its stage's blocks (the family adapter's ``from_state_dict(blocks=...)``), so both the network and the
rank's memory carry only those.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from comfyui_xdit.models.fp8_weights import picklable
from comfyui_xdit.request import ModelRef

from .errors import ModelMissing, PoolError
from .settings import HOST_MODELS_FOLDER_ENV, HOST_NO_LOCAL_WEIGHTS_ENV

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSource:
    """What a rank loads: ``ref``, from ``local_path`` on its disk or from ``shipped`` (an ObjectRef)."""

    ref: ModelRef
    local_path: Optional[str] = None
    shipped: Any = None  # ray.ObjectRef of dict[str, torch.Tensor], or None
    spec: Any = None  # the file's spec (models/families.py) when ``shipped`` holds one stage's blocks only
    blocks: Optional[tuple[int, int]] = None  # that stage's [start, stop) block range
    lora: Any = None  # ray.ObjectRef of tuple[LoraPatch, ...] merged on the rank, or None

    @property
    def how(self) -> str:
        if self.ref.is_tiny:
            return "built in"
        if self.local_path:
            return f"local file {self.local_path}"
        return ("object store" + (f" (blocks {self.blocks[0]}-{self.blocks[1] - 1} only)" if self.blocks else "")
                + (f" + LoRA {self.ref.patches}" if self.ref.patches else ""))


def candidate_paths(path: str, models_folder: Optional[str], environ: Mapping[str, str]) -> list[str]:
    """Where a host looks for ``path``: the path itself, then its models folder by file name."""
    folder = environ.get(HOST_MODELS_FOLDER_ENV) or models_folder
    out = [path]
    if folder:
        out.append(os.path.join(folder, os.path.basename(path)))
    return out


def find_local(ref: ModelRef, models_folder: Optional[str],
               environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The file this host would load for ``ref``, or None (tiny models need no file)."""
    environ = os.environ if environ is None else environ
    if ref.is_tiny or environ.get(HOST_NO_LOCAL_WEIGHTS_ENV) == "1":
        return None
    for candidate in candidate_paths(ref.path, models_folder, environ):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_for_shipping(ref: ModelRef, models_folder: Optional[str]) -> dict[str, torch.Tensor]:
    """Read the model file on the ComfyUI machine to send it to ranks without a copy.

    Raises ``FileNotFoundError`` when this machine has no copy either.
    """
    from comfyui_xdit.models.checkpoint_file import read_checkpoint

    for candidate in candidate_paths(ref.path, models_folder, {}):
        if os.path.isfile(candidate):
            return read_checkpoint(candidate)
    raise FileNotFoundError(ref.path)


def ship(state: Mapping[str, torch.Tensor], ref: ModelRef, parallel: Any,
         local_paths: list[Optional[str]]) -> list[WeightSource]:
    """Sources for every rank: its own file, else an object-store copy (per PipeFusion stage)."""
    import ray

    from comfyui_xdit.models.families import infer_spec, stage_state
    from comfyui_xdit.parallel.mesh import RankCoords
    from comfyui_xdit.parallel.pipefusion_schedule import parallel_stages

    if parallel.pipefusion_degree == 1:
        whole = ray.put(dict(state))
        return [WeightSource(ref, local_path=p, shipped=None if p else whole) for p in local_paths]
    spec = infer_spec(state, ref.path)
    bounds = parallel_stages(parallel, spec)
    objects: dict[int, Any] = {}
    sources = []
    for rank, path in enumerate(local_paths):
        if path:
            sources.append(WeightSource(ref, local_path=path))
            continue
        stage = RankCoords.of(rank, parallel).pipefusion
        if stage not in objects:
            objects[stage] = ray.put(stage_state(state, spec, bounds[stage]))
        sources.append(WeightSource(ref, shipped=objects[stage], spec=spec, blocks=tuple(bounds[stage])))
    return sources


def weight_sources(world: Any, ref: ModelRef, parallel: Any, held: Mapping[str, Any],
                   held_patches: Mapping[str, Any], folder: Optional[str], rpc_s: float) -> list[WeightSource]:
    """Where each rank of ``world`` (a ``World``) gets ``ref``'s weights: built in (tiny), its own disk, or
    tensors shipped through the object store (a ComfyUI MODEL's ``held`` weights and ``held_patches`` LoRAs,
    or the file read here for hosts that lack it); ``ModelMissing`` / ``PoolError`` name what to do."""
    sources = [WeightSource(ref)] * world.world_size
    if ref.is_in_memory:
        import ray

        if ref.path not in held or (ref.patches and ref.patches not in held_patches):
            raise PoolError(f"the weights of {ref.path} are no longer held by this pool; run the xDiT "
                            f"Parallelize Model node again")
        sources = ship(held[ref.path], ref, parallel, [None] * world.world_size)
        if ref.patches:
            lora = ray.put(held_patches[ref.patches])
            sources = [dataclasses.replace(source, lora=lora) for source in sources]
    elif not ref.is_tiny:
        local = world.call("has_file", ref, folder, timeout_s=rpc_s)
        lacking = [r for r, path in enumerate(local) if path is None]
        if lacking:
            hosts = sorted({world.ranks[r].host for r in lacking})
            try:
                state = picklable(read_for_shipping(ref, folder))  # an fp8 file's tensors as bytes
            except FileNotFoundError:
                raise ModelMissing(
                    f"model file {ref.path!r} is missing on host(s) {', '.join(hosts)} (ranks {lacking}) "
                    f"and on this machine; put it at that path or into the models folder "
                    f"({folder or 'set $COMFYUI_XDIT_MODELS_FOLDER on the host'})") from None
            logger.info("ranks %s on %s have no copy of %s: sending it through the object store",
                        lacking, ", ".join(hosts), ref.path)
            sources = ship(state, ref, parallel, local)
            del state
        else:
            sources = [WeightSource(ref, local_path=path) for path in local]
    return sources
