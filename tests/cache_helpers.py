"""Shared invariants of the prefix / image caches."""

from __future__ import annotations

import numpy as np


def assert_cached_matches_full(vlm, first_messages, follow_messages, *, atol: float = 1e-4) -> None:
    """Logits after a prefix-reused follow-up equal those of a from-scratch evaluation.

    Evaluates ``first_messages`` (filling the cache), then ``follow_messages``
    reusing the shared prefix; compares with ``follow_messages`` evaluated
    after a reset. On CPU with the same batch split they are bitwise equal;
    ``atol`` allows for backends that are not.
    """
    vlm.reset()
    vlm.next_token_logits(first_messages)
    cached = vlm.next_token_logits(follow_messages)
    assert vlm.engine.last_prefill.reused_positions > 0, "the follow-up reused no prefix"
    vlm.reset()
    full = vlm.next_token_logits(follow_messages)
    np.testing.assert_allclose(cached, full, rtol=0, atol=atol)
