"""edgevlm.kernels: compute graphs on ggml's CPU/CUDA/Metal kernels.

Vision towers and adapters that llama.cpp's multimodal library lacks (the
OmniFusion adapter) or computes wrongly (CLIP towers in its LLaVA graph), run
through ctypes bindings to the ggml libraries that llama-cpp-python ships.
See kernels/README.md. Nothing is loaded at import time: the libraries are
opened (and their struct layouts checked) on first use.
"""
