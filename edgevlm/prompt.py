"""Chat messages -> one prompt string with media markers + the images in order.

Messages are OpenAI / transformers shaped::

    {"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                 {"type": "text", "text": "Genre?"}]}

``{"type": "image_url", "image_url": {"url": "data:..."}}`` is accepted too.
The chat template comes from the GGUF (``tokenizer.chat_template``) when it
renders every image and text faithfully, otherwise from a built-in family
template (:data:`CHAT_FORMATS`, chosen by the model family).
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

from edgevlm.chunks import Chunk, settled_prefix
from edgevlm.errors import InvalidRequestError
from edgevlm.vision.images import LoadedImage, load_image

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImagePart:
    image: LoadedImage


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[str | ImagePart, ...]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


def normalize_messages(messages: Sequence[dict[str, Any]],
                       loader: Callable[[Any], LoadedImage] = load_image) -> list[Message]:
    """Validate OpenAI-style messages and decode their images.

    Raises:
        InvalidRequestError: a message is malformed (says which one and why).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise InvalidRequestError("messages is empty: give at least one user message")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise InvalidRequestError(f"messages[{i}] must be a dict with 'role' and 'content'")
        role = msg["role"]
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}]: role {role!r} is not one of {ROLES}")
        out.append(Message(role, tuple(_parts(msg.get("content"), i, loader))))
    return out


def _parts(content: Any, i: int, loader: Callable[[Any], LoadedImage]) -> Iterable[str | ImagePart]:
    if content is None:
        return
    if isinstance(content, str):
        yield content
        return
    if not isinstance(content, (list, tuple)):
        raise InvalidRequestError(f"messages[{i}].content must be a string or a list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            yield str(part.get("text", ""))
        elif kind == "image":
            ref = part.get("image", part.get("url", part.get("path")))
            if ref is None:
                raise InvalidRequestError(f"messages[{i}].content[{j}]: image part has no 'image'")
            yield ImagePart(loader(ref))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not url:
                raise InvalidRequestError(f"messages[{i}].content[{j}]: image_url part has no url")
            yield ImagePart(loader(url))
        else:
            raise InvalidRequestError(
                f"messages[{i}].content[{j}]: unsupported part type {kind!r} (use 'text', 'image' or 'image_url')")


#: Two questions that share no first character: a request rendered with each shows what the
#: real question cannot change (see :func:`edgevlm.chunks.settled_prefix`).
PROBE_QUESTIONS = ("A", "Z")


class Rendering(Protocol):
    """A rendered request: its prompt as chunks (an engine's prompt type)."""

    @property
    def chunks(self) -> Sequence[Chunk]: ...


R = TypeVar("R", bound=Rendering)


def settled_rendering(render: Callable[[list[Message]], R], messages: list[Message],
                      unmergeable: Container[int] = ()) -> tuple[R, list[Chunk]]:
    """What ``messages`` fix of the next request, whatever its question: ``render`` of ``messages``
    ended by each of :data:`PROBE_QUESTIONS`, and the chunks both share
    (:func:`edgevlm.chunks.settled_prefix`).

    Returns:
        The first rendering (its images and text prefix) and the settled chunks.
    """
    first, second = (render(with_question(messages, question)) for question in PROBE_QUESTIONS)
    return first, settled_prefix(first.chunks, second.chunks, unmergeable)


def with_question(messages: list[Message], question: str) -> list[Message]:
    """``messages`` with ``question`` appended to the last user message (or as a new user message)."""
    if messages and messages[-1].role == "user":
        last = messages[-1]
        return [*messages[:-1], Message("user", (*last.parts, question))]
    return [*messages, Message("user", (question,))]


# --------------------------------------------------------------------------
# built-in templates: (messages, marker, add_generation_prompt) -> prompt


def _llava15(messages: list[Message], marker: str, gen: bool) -> str:
    """LLaVA-1.5 (llava-hf): ``USER: <image>\\n... ASSISTANT: ...``."""
    out = []
    for m in messages:
        images = "".join(f"{marker}\n" for p in m.parts if isinstance(p, ImagePart))
        if m.role == "system":
            out.append(m.text + " ")
        elif m.role == "user":
            out.append(f"USER: {images}{m.text} ")
        else:
            out.append(f"ASSISTANT: {images}{m.text}</s>")
    if gen:
        out.append("ASSISTANT:")
    return "".join(out)


def _chatml(messages: list[Message], marker: str, gen: bool) -> str:
    out = []
    for m in messages:
        body = "".join(marker if isinstance(p, ImagePart) else p for p in m.parts)
        out.append(f"<|im_start|>{m.role}\n{body}<|im_end|>\n")
    if gen:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


CHAT_FORMATS: dict[str, Callable[[list[Message], str, bool], str]] = {
    "llava-1.5": _llava15,
    "chatml": _chatml,
}


# --------------------------------------------------------------------------
# GGUF (jinja) templates


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' ``{% generation %}`` marks assistant text; render it as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"the model's chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def precompile(template: str) -> None:
    """Compile a chat template now (load time); errors surface when it is rendered."""
    try:
        _compile(template)
    except Exception:  # noqa: BLE001 - reported by render_template on first use
        pass


def render_template(template: str, messages: list[Message], marker: str, *, gen: bool,
                    bos: str = "", eos: str = "") -> str | None:
    """Render a GGUF chat template; None if it does not carry every part faithfully.

    Two shapes are tried: string content with markers in place of images (what
    llama.cpp's server passes), then transformers-style part lists whose
    ``<image>`` placeholders are swapped for markers.
    """
    n_images = sum(isinstance(p, ImagePart) for m in messages for p in m.parts)
    texts = [p for m in messages for p in m.parts if isinstance(p, str) and p.strip()]
    attempts = (
        ([{"role": m.role, "content": "".join(marker if isinstance(p, ImagePart) else p
                                              for p in m.parts)} for m in messages], None),
        (part_lists(messages), "<image>"),
    )
    for payload, placeholder in attempts:
        try:
            text = _compile(template).render(messages=payload, add_generation_prompt=gen,
                                             bos_token=bos, eos_token=eos)
        except InvalidRequestError:
            raise
        except Exception:  # noqa: BLE001 - a template that cannot take this shape
            continue
        if placeholder is not None:
            if text.count(placeholder) != n_images or marker in text:
                continue
            text = text.replace(placeholder, marker)
        if text.count(marker) == n_images and all(t.strip() in text for t in texts):
            if bos and text.startswith(bos):
                text = text[len(bos):]  # the tokenizer adds BOS itself
            return text
    return None


def part_lists(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as transformers-style part lists: ``{"type": "image"}`` per image, text parts as they are."""
    return [{"role": m.role, "content": [{"type": "image"} if isinstance(p, ImagePart)
                                         else {"type": "text", "text": p} for p in m.parts]}
            for m in messages]


def render_parts(template: str, messages: list[Message], *, gen: bool, bos: str = "",
                 eos: str = "") -> str | None:
    """Render :func:`part_lists` with a chat template, images as the template itself writes them.

    For families whose template emits the model's own image placeholder (e.g.
    InternVL's ``<IMG_CONTEXT>``) where the processor expands it. A leading
    ``bos`` is removed (the tokenizer adds BOS itself).

    Returns:
        The text, or None when the template cannot take part lists or drops a text part.

    Raises:
        InvalidRequestError: the template refused the messages (``raise_exception``).
    """
    try:
        text = _compile(template).render(messages=part_lists(messages), add_generation_prompt=gen,
                                         bos_token=bos, eos_token=eos)
    except InvalidRequestError:
        raise
    except Exception:  # noqa: BLE001 - a template that cannot take this shape
        return None
    if not all(p.strip() in text for m in messages for p in m.parts if isinstance(p, str) and p.strip()):
        return None
    return text[len(bos):] if bos and text.startswith(bos) else text


def build_prompt(messages: list[Message], marker: str, *, template: str | None, chat_format: str,
                 gen: bool = True, bos: str = "", eos: str = "") -> tuple[str, list[LoadedImage]]:
    """The prompt text (images as markers) and the images in marker order."""
    text = None
    if template:
        text = render_template(template, messages, marker, gen=gen, bos=bos, eos=eos)
    if text is None:
        text = CHAT_FORMATS.get(chat_format, _chatml)(messages, marker, gen)
    images = [p.image for m in messages for p in m.parts if isinstance(p, ImagePart)]
    return text, images
