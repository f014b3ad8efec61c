"""Llama-3.2-Vision (mllama) end to end on ``edgevlm.kernels``: images + prompt -> tokens.

One conversation, greedy tokens; :mod:`edgevlm.mllama_engine` puts it behind
``edgevlm.load`` / ``VLM`` (prefix reuse across requests, sampling, stop strings,
streaming, the CLI).

* Tokenizer: llama.cpp cannot load the mllama LLM file, so its ``tokenizer.*``
  keys (and the Llama hyper-parameters llama.cpp reads first) are copied into
  a vocabulary-only GGUF (``general.architecture = "llama"``, no tensors) that
  llama.cpp loads with ``vocab_only``: the tokenizer code every other model uses.
* Images: :func:`edgevlm.vision.mllama_tiles.mllama_tiles` (MllamaImageProcessor's
  tiling) -> :class:`~edgevlm.kernels.mllama_vision.MllamaVisionEncoder`.
* Text: :class:`~edgevlm.kernels.mllama_text.MllamaTextModel` over the images'
  cross-attention states; the cross-attention mask comes from the prompt's
  ``<|image|>`` tokens as transformers' processor builds it.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm import constants as C
from edgevlm.errors import InvalidModelError, InvalidRequestError
from edgevlm.gguf_info import GGUFHeader, raw_metadata, read_header, write_raw_metadata
from edgevlm.kernels.mllama_text import MllamaTextModel, cross_attention_mask
from edgevlm.kernels.mllama_vision import MllamaVisionEncoder
from edgevlm.llm import LlamaModel, default_threads
from edgevlm.vision.mllama_tiles import MllamaTiles, mllama_tiles

#: ``mllama.*`` keys copied (as ``llama.*``) into the vocabulary file: what llama.cpp's loader
#: reads before it looks at the vocabulary.
VOCAB_HPARAMS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count", "attention.head_count_kv",
                 "attention.layer_norm_rms_epsilon", "rope.freq_base", "vocab_size")
GGUF_STRING = 8  # GGUF's value type id of a string


def write_vocab_gguf(llm_path: str | Path, out_path: str | Path, header: GGUFHeader | None = None) -> Path:
    """Write the vocabulary-only llama GGUF of an mllama LLM file (see the module docstring).

    The entries are copied as bytes (one pass over the file's metadata, nothing decoded);
    ``header``: the file's header when already read (for the architecture check).

    Raises:
        InvalidModelError: not a readable mllama LLM file.
    """
    header = header if header is not None else read_header(llm_path, with_tensors=False)
    if header.architecture != C.LLM_ARCH_MLLAMA:
        raise InvalidModelError(f"{llm_path} is not an mllama LLM file")
    hparams = {f"{C.LLM_ARCH_MLLAMA}.{k}": f"llama.{k}" for k in VOCAB_HPARAMS}
    entries = raw_metadata(llm_path, lambda key: key.startswith("tokenizer.") or key in hparams)
    arch = b"llama"
    renamed = [(hparams.get(key, key), type_id, value) for key, type_id, value in entries]
    return write_raw_metadata(out_path, [("general.architecture", GGUF_STRING,
                                          struct.pack("<Q", len(arch)) + arch), *renamed])


@dataclass(frozen=True)
class EncodedImage:
    """An image's tiles and its cross-attention states ``(max_tiles, tokens per tile, width)``."""

    tiles: MllamaTiles
    states: np.ndarray


class MllamaPipeline:
    """An mllama GGUF pair on ggml: tokenizer, vision encoder, text decoder.

    Args:
        llm_path: The ``mllama`` LLM GGUF.
        mmproj_path: The ``edgevlm-mllama`` projector GGUF.
        device: ggml device for both graphs.
        n_threads: CPU threads (default: :func:`edgevlm.llm.default_threads`).
        n_ctx: Tokens the KV cache holds.
        kv_type: the KV cache's type ("f32", "f16", "q8_0", "q4_0": see MllamaTextModel).
        headers: the two files' headers when already read (the model descriptor's), so that
            neither file is parsed again.
        text_progress, vision_progress: called with the fraction of the text decoder's
            (loaded first) and the vision encoder's weights uploaded; raising stops the load
            and frees what was loaded.

    Raises:
        InvalidModelError, UnsupportedModelError, KernelsUnavailableError.
    """

    def __init__(self, llm_path: str | Path, mmproj_path: str | Path, *, device: str = "auto",
                 n_threads: int | None = None, n_ctx: int = 2048, kv_type: str = "f16",
                 headers: tuple[GGUFHeader, GGUFHeader] | None = None,
                 text_progress: Callable[[float], None] | None = None,
                 vision_progress: Callable[[float], None] | None = None) -> None:
        threads = n_threads or default_threads()
        llm_header, mmproj_header = headers if headers is not None else (None, None)
        self._tmp = tempfile.TemporaryDirectory(prefix="edgevlm-mllama-")
        try:
            self.vocab = LlamaModel(write_vocab_gguf(llm_path, Path(self._tmp.name) / "vocab.gguf", llm_header),
                                    vocab_only=True)
            self.text = MllamaTextModel(llm_path, device=device, n_threads=threads, n_ctx=n_ctx, kv_type=kv_type,
                                        header=llm_header, progress=text_progress)
            self.vision = MllamaVisionEncoder(mmproj_path, device=device, n_threads=threads, header=mmproj_header,
                                              progress=vision_progress)
        except BaseException:
            self.close()
            raise

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` (BOS as the vocabulary says; special tokens parsed)."""
        return self.vocab.tokenize(prompt, add_special=True, parse_special=True)

    def tiles(self, image: Image.Image) -> MllamaTiles:
        """``image`` tiled as MllamaImageProcessor does, for this projector's tile size and limits."""
        cfg = self.vision.config
        return mllama_tiles(image, tile_size=cfg.image_size, max_image_tiles=cfg.max_image_tiles,
                            max_num_tiles=cfg.max_num_tiles, aspect_ratios=cfg.aspect_ratios,
                            mean=cfg.image_mean, std=cfg.image_std, resample=cfg.resample)

    def encode_image(self, image: Image.Image, cancelled: Callable[[], bool] | None = None) -> EncodedImage:
        """Tile ``image`` as MllamaImageProcessor does and run the vision encoder on it
        (``cancelled``: as in :meth:`MllamaVisionEncoder.encode`)."""
        tiles = self.tiles(image)
        return EncodedImage(tiles, self.vision.encode(tiles.pixels, tiles.aspect_ratio_id, tiles.n_tiles,
                                                      cancelled=cancelled))

    def start(self, prompt: str, images: Sequence[Image.Image | EncodedImage] = ()) -> np.ndarray:
        """Begin a conversation: encode the images, read the prompt; return the next-token logits.

        Raises:
            InvalidRequestError: the prompt's ``<|image|>`` tokens and the images disagree.
        """
        self.text.reset()
        self.history: list[int] = []
        self.pending: list[int] = []   # generated, not yet read (the last greedy token)
        self.encoded: list[EncodedImage] = []
        return self._read(self.tokenize(prompt), images)

    def follow_up(self, text: str, images: Sequence[Image.Image | EncodedImage] = ()) -> np.ndarray:
        """Continue the conversation with ``text`` (no BOS): only the new tokens are read.

        Images already in the conversation are neither re-encoded nor their cross-attention
        keys recomputed. Exactly what reading the whole conversation at once gives when no
        image is added; with new images, tokens read before them keep what they computed
        (transformers, re-reading everything, would let tokens before the *first* image
        attend to the new images too: their cross-attention rows are unmasked).

        Raises:
            InvalidRequestError: no conversation yet, or image tokens and images disagree.
        """
        if not getattr(self, "history", None):
            raise InvalidRequestError("follow_up() needs a conversation: call start() first")
        return self._read(self.vocab.tokenize(text, add_special=False, parse_special=True), images)

    def _read(self, tokens: list[int], images: Sequence[Image.Image | EncodedImage]) -> np.ndarray:
        tokens, self.pending = self.pending + tokens, []
        encoded = [i if isinstance(i, EncodedImage) else self.encode_image(i) for i in images]
        history = self.history + tokens
        all_images = self.encoded + encoded
        mask = None
        if all_images:
            tiles = [e.tiles.n_tiles for e in all_images]
            mask = cross_attention_mask(history, self.text.config.image_token_id, tiles,
                                        self.vision.config.max_num_tiles)[len(self.history):]
            if encoded:
                self.text.set_images([e.states for e in all_images], tiles)
        elif self.text.config.image_token_id in tokens:
            raise InvalidRequestError("the prompt has <|image|> tokens but no images were given")
        logits = self.text.forward(tokens, mask)[-1]
        self.history, self.encoded = history, all_images
        return logits

    def generate(self, prompt: str, images: Sequence[Image.Image | EncodedImage] = (), *,
                 max_tokens: int = 32, stop_at_eog: bool = True) -> list[int]:
        """Greedy tokens after ``prompt`` (a new conversation), up to ``max_tokens``."""
        logits = self.start(prompt, images)
        out: list[int] = []
        while len(out) < max_tokens:
            token = int(np.argmax(logits))
            out.append(token)
            if (stop_at_eog and self.vocab.is_eog(token)) or len(out) == max_tokens:
                self.pending = [token]
                break
            logits = self.text.forward([token])[-1]
            self.history.append(token)
        return out

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.detokenize(list(tokens))

    def close(self) -> None:
        for part in ("text", "vision", "vocab"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()
                setattr(self, part, None)
        self._tmp.cleanup()
