"""What a server accepts: the operator's settings and per-request limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Defaults of the per-request limits (``edgevlm serve --help`` shows them).
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_QUEUE = 16
DEFAULT_REMOTE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ServerConfig:
    """How ``edgevlm serve`` treats requests.

    Attributes:
        model_id: the model's name in responses and ``GET /v1/models``.
        api_key: when set, every ``/v1`` request must send
            ``Authorization: Bearer <api_key>`` (compared in constant time).
        allow_dirs: folders ``file://`` image URLs may point into (none: refused).
        allow_remote_images: fetch ``http(s)://`` image URLs (off: refused).
        remote_timeout_s: time limit for fetching one remote image.
        max_queue: requests waiting behind the one running; more get 503 with ``Retry-After``.
        max_image_bytes: largest encoded image accepted, from any source.
        max_image_pixels: largest image accepted (width x height, read from its header).
        max_images: most images in one request.
        max_body_bytes: largest request body.
        max_tokens: most tokens one reply may generate (None: what the context leaves).
    """

    model_id: str = "edgevlm"
    api_key: str | None = None
    allow_dirs: tuple[Path, ...] = field(default_factory=tuple)
    allow_remote_images: bool = False
    remote_timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S
    max_queue: int = DEFAULT_MAX_QUEUE
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        resolved = tuple(Path(d).expanduser().resolve() for d in self.allow_dirs)
        object.__setattr__(self, "allow_dirs", resolved)
