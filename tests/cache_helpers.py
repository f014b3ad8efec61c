"""Shared invariants of the prefix / image caches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FollowUp:
    """What the prefix-reused follow-up did.

    Attributes:
        stats: Its :class:`edgevlm.engine.PrefillStats`.
        encoder_calls: Vision encoder runs during the follow-up.
        first_positions: Positions of the first prompt.
        cached: Its next-token logits.
    """

    stats: object
    encoder_calls: int
    first_positions: int
    cached: np.ndarray


def assert_cached_matches_full(vlm, first_messages, follow_messages, *,
                               atol: float = 1e-4) -> FollowUp:
    """Logits after a prefix-reused follow-up equal those of a from-scratch evaluation.

    Evaluates ``first_messages`` (filling the cache), then ``follow_messages``
    reusing the shared prefix; compares with ``follow_messages`` evaluated
    after a reset. On CPU with the same batch split they are bitwise equal;
    ``atol`` allows for backends that are not.

    Returns:
        What the follow-up did, for further checks.
    """
    vlm.reset()
    vlm.next_token_logits(first_messages)
    first_positions = vlm.engine.last_prefill.prompt_positions
    calls = vlm.encoder_calls
    cached = vlm.next_token_logits(follow_messages)
    stats = vlm.engine.last_prefill
    follow_calls = vlm.encoder_calls - calls
    assert stats.reused_positions > 0, "the follow-up reused no prefix"
    vlm.reset()
    full = vlm.next_token_logits(follow_messages)
    np.testing.assert_allclose(cached, full, rtol=0, atol=atol)
    return FollowUp(stats, follow_calls, first_positions, cached)
