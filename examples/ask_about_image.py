"""Ask several questions about one image; the image is encoded once.

Usage:
    python examples/ask_about_image.py MODEL_DIR IMAGE "first question" "follow-up" ...

MODEL_DIR is a folder made by `edgevlm convert` (or any folder holding an LLM
GGUF and an mmproj GGUF). Nothing is downloaded.
"""

from __future__ import annotations

import sys

import edgevlm


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    model, image, *questions = argv
    vlm = edgevlm.load(model)
    messages: list[dict] = []
    for i, question in enumerate(questions):
        content: list[dict] = [{"type": "image", "image": image}] if i == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": question}]})
        print(f"> {question}")
        stream = vlm.stream(messages, max_tokens=128, temperature=0)
        for piece in stream:
            print(piece, end="", flush=True)
        reply = stream.reply()  # the whole text, token counts and timings
        pre = reply.prefill
        print(f"\n  [{pre.evaluated_positions} of {pre.prompt_positions} positions evaluated, "
              f"{pre.images_encoded} image(s) encoded, first token after {reply.timings['ttft_ms']:.0f} ms]")
        messages.append({"role": "assistant", "content": reply.text})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
