"""What a request did: typed statistics returned by the engine (for --verbose, bench and tests)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrefillStats:
    """What one prefill did."""

    prompt_positions: int = 0
    kv_cells: int = 0  # KV cells the prompt fills (> prompt_positions with M-RoPE images)
    reused_positions: int = 0
    evaluated_positions: int = 0
    images_encoded: int = 0
    images_from_cache: int = 0
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    snapshot_restored: bool = False
    parked_restored: bool = False
    restore_ms: float = 0.0
    snapshots_saved: int = 0
    images_reused: int = 0  # images in the reused prefix: neither encoded nor decoded
    saved_ms: float = 0.0  # estimated encode + prefill time avoided (this process's rates)


@dataclass(frozen=True)
class GenerationStats:
    """One reply: its prefill, tokens and timings (from the engine call, in ms).

    Attributes:
        prefill: what the prefill reused, encoded and evaluated.
        completion_tokens: tokens generated.
        finish_reason: "stop" (end of generation or a stop string), "length", or
            "cancelled" (the stream was closed or its cancel token set).
        ttft_ms: from the call to the first sampled token.
        total_ms: from the call to the end.
    """

    prefill: PrefillStats
    completion_tokens: int
    finish_reason: str
    ttft_ms: float
    total_ms: float

    @property
    def prompt_tokens(self) -> int:
        return self.prefill.prompt_positions


@dataclass(frozen=True)
class TokenAlternative:
    """One candidate token at a generated position and its log-probability."""

    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the most likely alternatives.

    The probabilities are the model's own (log-softmax of its logits), before
    sampling settings or a grammar narrow the choice.
    """

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TokenAlternative, ...] = ()


@dataclass
class Reply:
    """The result of :meth:`edgevlm.VLM.chat`; ``str(reply)`` is the text."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill: PrefillStats = field(default_factory=PrefillStats)
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: tuple[TokenLogprob, ...] = ()  # per generated token, when asked for (``logprobs=``)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def from_stats(cls, text: str, stats: GenerationStats, logprobs: tuple[TokenLogprob, ...] = ()) -> Reply:
        return cls(text=text, finish_reason=stats.finish_reason, prompt_tokens=stats.prompt_tokens,
                   completion_tokens=stats.completion_tokens, prefill=stats.prefill,
                   timings={"ttft_ms": stats.ttft_ms, "total_ms": stats.total_ms}, logprobs=logprobs)
