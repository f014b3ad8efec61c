"""Which image-token budget each image of a request gets.

The default budget shares what the context has left among a request's images.
Shared naively over every image of a conversation, adding an image in a later
turn would shrink the earlier ones: they would be re-planned, re-encoded and
the KV prefix holding them lost. Instead an image whose chunks are still in
the live or a parked KV state keeps the budget it was planned under (same
plan, same chunk keys: the prefix is reused); only the new images share the
context the kept ones leave.

:class:`ImagePlans` remembers, per image (content digest), the budget it was
planned under, the keys of its chunks and the KV cells they fill.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from edgevlm.chunks import Chunk, image_groups
from edgevlm.vision.images import LoadedImage

#: Images remembered (least recently planned forgotten first).
MAX_REMEMBERED = 512


@dataclass(frozen=True)
class ImagePlan:
    """How an image was planned in an earlier request.

    Attributes:
        chosen: the budget asked for then (request's or load default; None: none).
        tokens: the budget the image got (what its plan was made under).
        keys: its chunks' cache keys.
        cells: KV cells its chunks fill.
    """

    chosen: int | None
    tokens: int | None
    keys: frozenset[str]
    cells: int


class ImagePlans:
    """The plans of recently prompted images (see the module doc)."""

    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self.max_remembered = max_remembered
        self._plans: OrderedDict[str, ImagePlan] = OrderedDict()

    def clear(self) -> None:
        self._plans.clear()

    def kept(self, images: Sequence[LoadedImage], chosen: int | None, held: set[str]) -> dict[str, ImagePlan]:
        """The images (by digest) that keep their earlier plan: planned under the same ``chosen``
        budget and every chunk still held in a KV state (``held``: the held chunk keys)."""
        out: dict[str, ImagePlan] = {}
        for image in images:
            plan = self._plans.get(image.digest)
            if plan is not None and plan.chosen == chosen and plan.keys and plan.keys <= held:
                out[image.digest] = plan
        return out

    def record(self, images: Sequence[LoadedImage], budgets: Sequence[int | None], chosen: int | None,
               chunks: Sequence[Chunk]) -> None:
        """Remember how ``images`` (in prompt order, each under ``budgets[i]``) were planned.

        When the chunks cannot be told apart per image (the same image twice with nothing
        between), nothing is recorded: those images are planned afresh next time.
        """
        groups = image_groups(chunks)
        if len(groups) != len(images):
            return
        for image, tokens, group in zip(images, budgets, groups):
            self._plans[image.digest] = ImagePlan(chosen, tokens, frozenset(c.key for c in group),
                                                  sum(c.n_cells for c in group))
            self._plans.move_to_end(image.digest)
        while len(self._plans) > self.max_remembered:
            self._plans.popitem(last=False)
