"""Image intake and vision encoders.

A vision encoder turns a prompt with media markers plus decoded images into a
list of chunks (text tokens and image chunks), encodes image chunks into the
embeddings the LLM receives, and decodes them into the LLM context. Today one
implementation exists, :class:`edgevlm.vision.mtmd.MtmdEncoder` (libmtmd);
``edgevlm.kernels`` will add a second behind the same interface.
"""

from edgevlm.vision.images import LoadedImage, load_image

__all__ = ["LoadedImage", "load_image"]
