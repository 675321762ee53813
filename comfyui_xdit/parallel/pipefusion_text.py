"""PipeFusion's prompt tokens once a step instead of once a patch, for the joint-text families that allow it.

In a joint-text model (Flux) the L prompt tokens run through every block beside the image tokens. Carried
per patch, they run M times a step: with 64 prompt tokens and four 256-token patches that is 25% more rows
in every matmul than the serial step. With ``text_once`` only the first patch of a step (and every
whole-latent warm-up item) carries the prompt; each stage's attention keeps, per layer, the text K/V that
item produced (``StaleKVAttention.text_kv``), and the step's later patches run their blocks on zero text
tokens and attend over those cached text K/V + the image buffer. The text K/V they read are this step's
(the first patch passed every layer before them), one step fresher than the stale image K/V of later
patches; the text hidden state itself is only ever needed as K/V, so nothing else changes. M = 1 and
warm-up stay exactly serial.

A family opts in with ``Family.text_once`` when its adapter's blocks run on an empty text stream (a
(B, 0, width) context and rotary table for the image tokens alone); the others keep the text per patch.
"""

from __future__ import annotations

import dataclasses

from ..conditioning import Conditioning
from ..models.adapter import Adapter
from ..models.families import family_of
from .pipefusion_schedule import Work


def uses_text_once(adapter: Adapter) -> bool:
    """Whether PipeFusion runs ``adapter``'s prompt tokens once a step (see the module docstring)."""
    return family_of(adapter.spec).text_once


def carries_text(work: Work) -> bool:
    """The items that run the prompt tokens: the whole latent in warm-up, else a step's first patch."""
    return work.is_warmup or work.patch == 0


def without_text(cond: Conditioning) -> Conditioning:
    """``cond`` with zero prompt tokens: (B, 0, width) context (and mask); the pooled vector and the
    guidance, which the timestep embedding reads, stay."""
    mask = cond.context_mask
    return dataclasses.replace(cond, context=cond.context[:, :0], context_mask=None if mask is None else mask[:, :0])


def item_conds(conds: list[Conditioning], text_once: bool) -> tuple[list[Conditioning], list[Conditioning]]:
    """(the forwards' conds for items that carry the prompt, those for items that do not), built once a run."""
    return conds, ([without_text(c) for c in conds] if text_once else conds)
