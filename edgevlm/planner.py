"""The memory planner: what a model, its context and its largest image will take, before loading.

Everything comes from the GGUF headers (:mod:`edgevlm.descriptor`) and the
model family: LLM weights (per layer, per device), the KV cache, llama.cpp's
compute and output buffers, the projector's weights, the vision encoder's
compute for the largest image the budget allows, the image itself while it is
decoded, its embeddings, the KV copies a snapshot or a parked conversation
takes, and the process (interpreter + libraries, measured in this process).

The formulas were fitted to what llama.cpp 0.3.36's own logs report and to
peak RSS measured on the CPU (see README "Fit the machine"):

* KV cache: ``n_layer * n_ctx * (n_embd_k + n_embd_v) * bytes(kv_type)``;
* compute buffer: the larger of the attention phase (without flash attention
  the KQ scores ``n_head * n_ctx * n_ubatch`` f32, plus an FFN and a few
  hidden states per ubatch row) and the output phase (``n_vocab`` logits per
  ubatch row);
* vision compute per view (flash attention, as both engines run it):
  ``T * (n_ff + 4 * width)`` f32 for ``T`` tokens; batched views add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import InvalidRequestError
from edgevlm.gguf_info import TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.families.base import Family

MiB = 1 << 20
#: Bytes per KV element by type (ggml block sizes: q8_0 34 B / 32, q4_0 18 B / 32).
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
#: Context llama.cpp creates when none is asked for (see edgevlm.llm.DEFAULT_CTX).
DEFAULT_CTX = 4096
#: Threads' stacks, allocator slack and small buffers not counted elsewhere (measured: 8-20 MiB).
RUNTIME_SLACK = 16 * MiB


@dataclass(frozen=True)
class MemoryPart:
    """One consumer of memory.

    Attributes:
        name: what it is ("llm weights", "kv cache", ...).
        device: where ("CPU", or a GPU device name).
        nbytes: how much.
        detail: how it was computed, for people.
    """

    name: str
    device: str
    nbytes: int
    detail: str = ""


@dataclass(frozen=True)
class PlanSettings:
    """What the plan assumed (the settings a load with it uses)."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    kv_type: str
    flash_attn: bool
    n_gpu_layers: int
    image_tokens: int
    image_views: int
    vision_device: str
    cache: bool


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per part and device, and the totals."""

    parts: tuple[MemoryPart, ...]
    settings: PlanSettings
    budget_bytes: int | None = None
    suggestions: tuple[str, ...] = field(default=())

    @property
    def ram_bytes(self) -> int:
        """Host memory the process peaks at."""
        return sum(p.nbytes for p in self.parts if p.device == "CPU")

    @property
    def vram_bytes(self) -> dict[str, int]:
        """Device memory per GPU device."""
        out: dict[str, int] = {}
        for part in self.parts:
            if part.device != "CPU":
                out[part.device] = out.get(part.device, 0) + part.nbytes
        return out

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.ram_bytes + sum(self.vram_bytes.values()) <= self.budget_bytes

    def by_name(self, name: str) -> int:
        return sum(p.nbytes for p in self.parts if p.name == name)

    def as_json(self) -> dict[str, object]:
        """The plan as JSON-able data (``edgevlm plan --json``)."""
        from dataclasses import asdict

        return {"ram_bytes": self.ram_bytes, "vram_bytes": self.vram_bytes, "fits": self.fits,
                "budget_bytes": self.budget_bytes, "parts": [asdict(p) for p in self.parts],
                "settings": asdict(self.settings), "suggestions": list(self.suggestions)}

    def summary(self) -> str:
        """One line: the total and the main parts (for refusals)."""
        order = sorted(self.parts, key=lambda p: -p.nbytes)[:5]
        parts = ", ".join(f"{p.name} {gib(p.nbytes)}" for p in order)
        return f"needs {gib(self.ram_bytes)} of RAM ({parts})"


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MiB:.0f} MiB"


def tensor_bytes(info: TensorInfo) -> int:
    """Bytes a tensor of this ggml type and shape takes."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    return math.prod(info.shape) // block * size


def parse_size(text: str) -> int:
    """``"300MiB"``, ``"1.5G"``, ``"2GiB"``, ``"800M"``, ``"123456"`` -> bytes.

    Raises:
        InvalidRequestError: not a size.
    """
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": MiB, "mb": 10**6,
             "mib": MiB, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise InvalidRequestError(f"{text!r} is not a memory size; write e.g. 800MiB, 1.5GiB or 4G")
    return int(value * units[unit])
