"""Our GGUF files work in other llama.cpp tools: llama-cpp-python's own chat handler."""

from __future__ import annotations

import base64


def test_llama_cpp_python_chat_handler_loads_our_pair(siglip_f32, painting):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    llm_path = next(p for p in siglip_f32.glob("*.gguf") if not p.name.startswith("mmproj"))
    mmproj = next(siglip_f32.glob("mmproj*.gguf"))
    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(model_path=str(llm_path), chat_handler=handler, n_ctx=512, n_threads=2, verbose=False)
    url = "data:image/png;base64," + base64.b64encode(painting.read_bytes()).decode()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Genre?"}]}],
        max_tokens=3, temperature=0)
    assert out["usage"]["prompt_tokens"] > 16  # the 16 image tokens were evaluated
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
