"""edgevlm.kernels: compute graphs on ggml's CPU/CUDA/Metal kernels.

Role (see kernels/README.md): vision towers and adapters that llama.cpp's
multimodal library lacks (the OmniFusion adapter) or computes wrongly (CLIP
towers in its LLaVA graph), run through ctypes bindings to the ggml libraries
that llama-cpp-python ships. Nothing is implemented yet: the runtime uses
libmtmd for every projector until this package lands.
"""
