"""First-turn TTFT of edgevlm, llama-cpp-python (MTMDChatHandler) and transformers f32/bf16, one process.

Usage (the bench model with its checkpoint kept, test extras installed):
    python examples/make_bench_model.py out/bench336 --tower clip-l14-336 --keep-checkpoint
    python examples/first_turn_table.py out/bench336 painting.png --threads 2 --rounds 2

Same GGUF pair / checkpoint, image, question and threads for all; one greedy
token each. "first" is each engine's first request in this process (edgevlm
goes first, right after load, so its figure is a fresh process's first
request; its second, different request is printed too); "warm" is the median
of ``--rounds`` rounds interleaved edgevlm, llama-cpp-python, transformers
f32, bf16, so that background load hits all alike. "edgevlm_prepared" is the
first turn as ``edgevlm chat --image`` runs it: the image prepared when it is
attached ("edgevlm_prepare", while the question is typed), then the question.
"..._image_warm_ms" is the part of a warm turn spent on the vision tower and
projector (the rest is mostly the LLM reading the prompt).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("image")
    parser.add_argument("--question", default="Describe this image in one sentence.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import edgevlm
    from edgevlm.benchmarks.compare import load_peer, peer_turn
    from edgevlm.benchmarks.first_request import first_and_second_request
    from edgevlm.benchmarks.probe import image_question
    from edgevlm.benchmarks.transformers_ref import (_first_turn, _load, edgevlm_first_turn,
                                                    edgevlm_prepared_turn_ms, find_checkpoint)

    t0 = time.perf_counter()
    vlm = edgevlm.load(args.model, n_threads=args.threads, cache=False)
    out: dict[str, object] = {"edgevlm_load_ms": round((time.perf_counter() - t0) * 1e3)}
    out.update(first_and_second_request(vlm, args.image, args.question, "What colours dominate?", 1))
    print(json.dumps(out), file=sys.stderr, flush=True)
    messages = image_question(args.image, args.question)
    peer, _ = load_peer(vlm)
    out["llama_cpp_python_first_ms"] = round(peer_turn(peer, messages, 1)["ttft_ms"])

    import torch

    torch.set_num_threads(args.threads)
    checkpoint = find_checkpoint(args.model, None)
    assert checkpoint is not None, "no hf/ folder next to the model (make_bench_model.py --keep-checkpoint)"
    hf = {label: _load(checkpoint, dtype) for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16))}
    for label, (model, processor) in hf.items():
        out[f"transformers_{label}_first_ms"] = round(_first_turn(model, processor, args.image, args.question).ttft_ms)
    images: dict[str, list[float]] = {"edgevlm": [], "transformers_f32": [], "transformers_bf16": []}
    runs: dict[str, list[float]] = {"edgevlm": [], "edgevlm_prepare": [], "edgevlm_prepared": [],
                                    "llama_cpp_python": [], "transformers_f32": [], "transformers_bf16": []}
    for _ in range(args.rounds):
        turn = edgevlm_first_turn(vlm, args.image, args.question)
        runs["edgevlm"].append(turn.ttft_ms)
        images["edgevlm"].append(turn.image_ms)
        prepare_ms, prepared_ms = edgevlm_prepared_turn_ms(vlm, args.image, args.question)
        runs["edgevlm_prepare"].append(prepare_ms)
        runs["edgevlm_prepared"].append(prepared_ms)
        runs["llama_cpp_python"].append(peer_turn(peer, messages, 1)["ttft_ms"])
        for label, (model, processor) in hf.items():
            turn = _first_turn(model, processor, args.image, args.question)
            runs[f"transformers_{label}"].append(turn.ttft_ms)
            images[f"transformers_{label}"].append(turn.image_ms)
    for name, times in runs.items():
        out[f"{name}_warm_ms"] = round(statistics.median(times))
        out[f"{name}_warm_all_ms"] = [round(t) for t in times]
    for name, times in images.items():  # the vision tower + projector's share of the warm turns
        out[f"{name}_image_warm_ms"] = round(statistics.median(times))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
