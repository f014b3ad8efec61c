"""The transformers reference: a first turn split into the image and the rest; clear errors."""

from __future__ import annotations

import importlib.util
import time

import pytest

SLOW_VISION_S = 0.3


def test_first_turn_charges_vision_time_to_the_image(llava_siglip_checkpoint, painting):
    """A vision module made 0.3 s slower moves 0.3 s into ``image_ms`` and none into ``prompt_ms``;
    the timing hooks are gone afterwards."""
    torch = pytest.importorskip("torch")
    from edgevlm.benchmarks.transformers_ref import IMAGE_MODULES, _first_turn, _load

    torch.set_num_threads(2)
    model, processor = _load(llava_siglip_checkpoint, torch.float32)
    vision = [getattr(model.model, name) for name in IMAGE_MODULES if getattr(model.model, name, None) is not None]
    assert len(vision) == 2  # LLaVA: the vision tower and the projector
    _first_turn(model, processor, str(painting), "What is this?")  # warm-up: first calls are slower
    plain = _first_turn(model, processor, str(painting), "What is this?")
    assert 0 < plain.image_ms < plain.ttft_ms

    slow = vision[0].register_forward_hook(lambda *_: time.sleep(SLOW_VISION_S))
    try:
        slowed = _first_turn(model, processor, str(painting), "What is this?")
    finally:
        slow.remove()
    assert slowed.image_ms >= SLOW_VISION_S * 1e3  # the sleep is inside the vision module's forward
    assert slowed.prompt_ms < plain.prompt_ms + SLOW_VISION_S * 1e3 / 2
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vision)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_processor_needing_torchvision_is_a_clear_error(qwen2vl_checkpoint):
    """transformers' Qwen2-VL processor needs torchvision: one edgevlm error naming it, not an ImportError."""
    torch = pytest.importorskip("torch")
    from edgevlm.benchmarks.transformers_ref import _load
    from edgevlm.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="torchvision") as caught:
        _load(qwen2vl_checkpoint, torch.float32)
    message = str(caught.value)
    assert "\n" not in message and str(qwen2vl_checkpoint) in message and "not found in your environment;" in message
