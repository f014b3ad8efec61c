"""``edgevlm serve`` runs Llama-3.2-Vision (mllama) like any other model (the VLM API only)."""

from __future__ import annotations

import pytest

from tests.fixtures.internvl import gradient_image
from tests.server.serving import data_url, image_message, running_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow


def test_mllama_stream_and_reply_agree_and_follow_up(mllama_f32_result, tmp_path):
    import io

    buf = io.BytesIO()
    gradient_image(120, 80).save(buf, format="PNG")
    messages = [image_message(data_url(buf.getvalue()), "what is it?")]
    with running_server(mllama_f32_result.llm_path.parent, tmp_path / "home", "--ctx", "256",
                        "--gpu-layers", "0") as (base, _):
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
        whole = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
        text = whole.choices[0].message.content
        pieces = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert streamed.strip() == text and whole.usage.completion_tokens > 0
        follow = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "and?"}]
        again = client.chat.completions.create(model="m", messages=follow, max_tokens=4, temperature=0)
        assert again.usage.prompt_tokens > whole.usage.prompt_tokens
