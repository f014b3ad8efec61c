"""LLaVA-NeXT / LLaVA-1.6 (llava-hf ``LlavaNextForConditionalGeneration``) converter.

Everything LLaVA-1.5 writes (:mod:`.llava`: Llama/Mistral LLM, CLIP tower cut
at the feature layer, 2-layer MLP projector), plus what llama.cpp's own
llava-v1.6 conversion carries so that libmtmd loads the projector (source:
the vendored llama.cpp of llama-cpp-python 0.3.36,
``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`` and
``tools/mtmd/clip.cpp``):

* ``clip.vision.image_grid_pinpoints``: config.json's ``(height, width)``
  pairs flattened in that order;
* ``clip.vision.mm_patch_merge_type = "spatial_unpad"``;
* the learned ``image_newline`` vector as ``v.image_newline`` (the name
  clip.cpp reads; the legacy converter wrote ``model.image_newline``, which
  this clip.cpp ignores).

Tiles are cut at the tower's ``image_size``; the image processor must resize
to it (``shortest_edge`` / ``crop_size`` equal to ``vision_config.image_size``),
as every llava-hf release does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgevlm import constants
from edgevlm.errors import ConversionError, UnsupportedModelError

from .base import register
from .llava import LlavaConverter
from .projector_writer import image_processor_config
from .tensors import TensorSpec

DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
"""transformers' LlavaNextConfig default ``image_grid_pinpoints``."""
NEWLINE_SOURCES = ("model.image_newline", "image_newline")
"""Checkpoint names of the newline vector (transformers 5, then 4)."""


def parse_pinpoints(value: Any, tile_size: int) -> tuple[tuple[int, int], ...]:
    """Check config.json's ``image_grid_pinpoints``.

    Args:
        value: The JSON value (a list of ``[height, width]`` lists) or None.
        tile_size: The tower's ``image_size``; pinpoints must be multiples of it.

    Returns:
        ``(height, width)`` pairs (transformers' default when ``value`` is None).

    Raises:
        ConversionError: not a non-empty list of positive int pairs, or not
            multiples of ``tile_size``.
    """
    if value is None:
        value = DEFAULT_PINPOINTS
    ok = isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p) for p in value)
    if not ok:
        raise ConversionError("config.json: image_grid_pinpoints must be a non-empty list of "
                              f"[height, width] pairs of positive integers, got {value!r}.")
    pairs = tuple((int(h), int(w)) for h, w in value)
    bad = [p for p in pairs if p[0] % tile_size or p[1] % tile_size]
    if bad:
        raise ConversionError(f"config.json: image grid pinpoint {list(bad[0])} is not a multiple "
                              f"of the vision tower's image_size {tile_size}.")
    return pairs


def _processor_size(data: dict[str, Any], key: str) -> int | None:
    entry = data.get(key)
    if isinstance(entry, dict):
        value = entry.get("shortest_edge", entry.get("height"))
        return int(value) if isinstance(value, int) else None
    return int(entry) if isinstance(entry, int) else None


@register("LlavaNextForConditionalGeneration")
class LlavaNextConverter(LlavaConverter):
    """LLaVA-1.6: LLaVA-1.5's pieces plus grid pinpoints and the image newline."""

    def validate(self) -> None:
        """LLaVA-1.5's checks, then pinpoints, the newline tensor and the processor sizes.

        Raises:
            ConversionError: bad pinpoints, a missing or misshapen ``image_newline``.
            UnsupportedModelError: (see :class:`LlavaConverter`), or an image
                processor whose tile size is not the tower's image size.
        """
        super().validate()
        cfg = self.config
        tile = cfg.vision.image_size
        self.pinpoints = parse_pinpoints(self.raw_config.get("image_grid_pinpoints"), tile)
        names = set(self.reader.names())
        found = [n for n in NEWLINE_SOURCES if n in names]
        if not found:
            raise ConversionError(f"tensor 'model.image_newline' is missing from the checkpoint in "
                                  f"{self.folder}; the download may be incomplete.")
        self.newline_source = found[0]
        shape = tuple(self.reader.shape(self.newline_source))
        if shape != (cfg.text.hidden_size,):
            raise ConversionError(f"tensor {self.newline_source!r} has shape {list(shape)} but "
                                  f"config.json implies [{cfg.text.hidden_size}].")
        processor = image_processor_config(self.folder)
        for key in ("size", "crop_size"):
            size = _processor_size(processor, key)
            if size is not None and size != tile:
                raise UnsupportedModelError(
                    f"the image processor's {key} is {size} but the vision tower takes {tile}-pixel "
                    "tiles; only processors that resize tiles to the tower's size are supported.")
        proc_pinpoints = processor.get("image_grid_pinpoints")
        if proc_pinpoints and [tuple(p) for p in proc_pinpoints] != list(self.pinpoints):
            self.note("the image processor's image_grid_pinpoints differ from config.json's; "
                      "config.json's (the model's) are written.")

    def projector_tensors(self, vision_type: str) -> list[TensorSpec]:
        """LLaVA-1.5's tower + MLP tensors plus ``v.image_newline`` (always F32)."""
        specs = super().projector_tensors(vision_type)
        specs.append(TensorSpec(constants.TENSOR_IMAGE_NEWLINE, self.newline_source,
                                (self.config.text.hidden_size,), "F32"))
        return specs

    def write_projector_metadata(self, writer: Any) -> None:
        """LLaVA-1.5's keys plus the flattened pinpoints and the patch merge type."""
        super().write_projector_metadata(writer)
        writer.add_array(constants.KEY_IMAGE_GRID_PINPOINTS, flatten_pinpoints(self.pinpoints))
        writer.add_string(constants.KEY_MM_PATCH_MERGE_TYPE, constants.PATCH_MERGE_SPATIAL_UNPAD)


def flatten_pinpoints(pinpoints: Sequence[Sequence[int]]) -> list[int]:
    """``[(h0, w0), (h1, w1)...]`` -> ``[h0, w0, h1, w1...]`` (llama.cpp's layout)."""
    return [int(x) for pair in pinpoints for x in pair]
