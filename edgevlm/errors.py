"""Exceptions raised by edgevlm.

Every user-facing failure is an :class:`EdgeVLMError`. Each subclass also
inherits the builtin exception a Python caller would expect, so
``except FileNotFoundError`` keeps working. Messages say what was wrong and
what to do about it; the CLI prints them as one line.
"""

from __future__ import annotations


class EdgeVLMError(Exception):
    """Base class of all edgevlm errors."""


class ModelNotFoundError(EdgeVLMError, FileNotFoundError):
    """A model file, folder or repository could not be found."""


class InvalidModelError(EdgeVLMError, ValueError):
    """A file exists but is not a model edgevlm can use (not GGUF, corrupt, ...)."""


class UnsupportedModelError(EdgeVLMError, ValueError):
    """The model or checkpoint is of a kind edgevlm does not support (yet)."""


class IncompatibleModelError(EdgeVLMError, ValueError):
    """Two files do not belong together (e.g. projector width != LLM width)."""


class ImageError(EdgeVLMError, ValueError):
    """An image could not be read or decoded."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image file does not exist."""


class ContextOverflowError(EdgeVLMError, ValueError):
    """The prompt does not fit into the context window."""


class InvalidRequestError(EdgeVLMError, ValueError):
    """Messages or options passed to the API are malformed."""


class ConversionError(EdgeVLMError, ValueError):
    """A checkpoint could not be converted."""


class UnsafePickleError(ConversionError):
    """A pickle file asked for a global that edgevlm refuses to load."""


class RuntimeFailure(EdgeVLMError, RuntimeError):
    """llama.cpp or libmtmd reported a failure while running a model."""


class ComputeCancelled(EdgeVLMError, RuntimeError):
    """A graph computation was stopped by its cancel check before it finished.

    Raised by llama.cpp decodes inside :meth:`LlamaContext.stoppable` and by :mod:`edgevlm.kernels`
    graphs given ``cancelled``; the engines catch it (a cancelled request or preparation ends
    there, nothing half-done kept), so it does not reach users of :class:`edgevlm.VLM`.

    Args:
        message: what was stopped.
        decoded: tokens of the stopped call that were already in the KV cache (its
            earlier batches), for a caller that keeps them.
    """

    def __init__(self, message: str, decoded: int = 0) -> None:
        super().__init__(message)
        self.decoded = decoded


class HubError(EdgeVLMError, OSError):
    """Downloading from the Hugging Face hub failed."""


class KernelsUnavailableError(EdgeVLMError, RuntimeError):
    """edgevlm.kernels cannot run: ggml libraries missing or not the pinned layout."""


class UnhealthyInstallError(EdgeVLMError, RuntimeError):
    """``edgevlm doctor`` found a problem with this installation (libraries, cache folder, kernels)."""


class MemoryBudgetError(EdgeVLMError, MemoryError):
    """The model, its context and its images would not fit the memory budget (nothing was loaded)."""


class ConfigError(EdgeVLMError, ValueError):
    """edgevlm's config file is unreadable or unwritable, or a key or value given to it is not valid."""


class DataError(EdgeVLMError, ValueError):
    """An evaluation data file (items CSV, choices list, prompt template) is malformed."""


class RunConflictError(EdgeVLMError, FileExistsError):
    """An output folder holds another evaluation run (other model, prompt or choices)."""
