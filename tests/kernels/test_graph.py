"""Every op of the graph layer against numpy / PyTorch, on odd shapes.

Tolerances (f32 weights): 1e-5 relative to the output scale for linear,
norm and activations; 1e-5 for attention and transformer layers. f16 and
Q8_0 weights are compared with numpy on the same (de)quantised values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgevlm.errors import InvalidModelError, RuntimeFailure
from edgevlm.kernels import ggml
from edgevlm.kernels.backend import Backend, available_devices
from edgevlm.kernels.graph import CompiledGraph, GraphBuilder, RawTensor, Weights, linear_once

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def cpu():
    backend = Backend("cpu", n_threads=2)
    yield backend
    backend.close()


def run_graph(backend, arrays, build, inputs):
    """Upload ``arrays`` as weights, build with ``build(builder, weights, input_tensors)``, run."""
    weights = Weights(backend, {k: v if isinstance(v, RawTensor) else RawTensor.from_numpy(v)
                                for k, v in arrays.items()})
    b = GraphBuilder()
    tensors = {name: b.input(name, tuple(reversed(x.shape))) for name, x in inputs.items()}
    graph = CompiledGraph(backend, b, build(b, weights, tensors))
    try:
        return graph.run(inputs), graph
    finally:
        graph.close()
        weights.close()


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def close(a, b, tol=1e-5):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("n_in,n_out,n", [(45, 37, 3), (64, 33, 50), (7, 1, 1), (300, 257, 9)])
def test_linear(cpu, n_in, n_out, n):
    w, bias, x = rand(n_out, n_in), rand(n_out), rand(n, n_in)
    out, _ = run_graph(cpu, {"w": w, "b": bias}, lambda b, W, t: b.linear(t["x"], W["w"], W["b"]), {"x": x})
    close(out, x @ w.T + bias)


def test_linear_f16_weights(cpu):
    w, x = rand(33, 70).astype(np.float16), rand(5, 70)
    out, _ = run_graph(cpu, {"w": w}, lambda b, W, t: b.linear(t["x"], W["w"]), {"x": x})
    # ggml rounds the activations to f16 for an f16 weight product
    ref = x.astype(np.float16).astype(np.float32) @ w.astype(np.float32).T
    close(out, ref, 1e-3)


def test_linear_q8_0_weights(cpu):
    from gguf import GGMLQuantizationType, quants

    w, x = rand(19, 96), rand(11, 96)
    q = quants.quantize(w, GGMLQuantizationType.Q8_0)
    raw = RawTensor(ggml.GGML_TYPE_Q8_0, (96, 19), q)
    out, _ = run_graph(cpu, {"w": raw}, lambda b, W, t: b.linear(t["x"], W["w"]), {"x": x})
    ref = x @ quants.dequantize(q, GGMLQuantizationType.Q8_0).reshape(19, 96).T
    close(out, ref, 2e-2)  # activations are quantised to Q8 too


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layer_norm(cpu, eps):
    x, w, bias = rand(13, 77, scale=3.0), rand(77), rand(77)
    out, _ = run_graph(cpu, {"w": w, "b": bias}, lambda b, W, t: b.layer_norm(t["x"], W["w"], W["b"], eps), {"x": x})
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    close(out, (x - mu) / np.sqrt(var + eps) * w + bias)


def _erf(x):
    return np.vectorize(math.erf)(x).astype(np.float32)


ACTS = {
    "relu": lambda x: np.maximum(x, 0),
    "gelu_erf": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "gelu_quick": lambda x: x / (1 + np.exp(-1.702 * x)),
}


@pytest.mark.parametrize("kind", sorted(ACTS))
def test_activations(cpu, kind):
    x = rand(9, 41, scale=3.0)
    out, _ = run_graph(cpu, {}, lambda b, W, t: b.activation(t["x"], kind), {"x": x})
    # ggml's gelu variants use f16 lookup tables / fast approximations on CPU
    close(out, ACTS[kind](x), 1e-5 if kind == "relu" else 2e-3)


def test_unknown_activation_is_refused(cpu):
    with pytest.raises(InvalidModelError, match="unknown activation"):
        run_graph(cpu, {}, lambda b, W, t: b.activation(t["x"], "swish"), {"x": rand(2, 3)})


def _mha(x, p, heads):
    n, d = x.shape
    dh = d // heads
    q, k, v = (x @ p[f"w{c}"].T + p[f"b{c}"] for c in "qkv")
    q, k, v = (m.reshape(n, heads, dh).transpose(1, 0, 2) for m in (q, k, v))
    s = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = (s @ v).transpose(1, 0, 2).reshape(n, d)
    return o @ p["wo"].T + p["bo"]


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("d,heads,n", [(48, 4, 37), (40, 5, 1), (96, 3, 65)])
def test_attention(cpu, d, heads, n, flash):
    p = {f"w{c}": rand(d, d, scale=0.3) for c in "qkvo"} | {f"b{c}": rand(d, scale=0.3) for c in "qkvo"}
    x = rand(n, d)

    def build(b, W, t):
        pair = lambda c: (W[f"w{c}"], W[f"b{c}"])  # noqa: E731
        return b.attention(t["x"], pair("q"), pair("k"), pair("v"), pair("o"), n_head=heads, flash=flash)

    out, _ = run_graph(cpu, p, build, {"x": x})
    close(out, _mha(x, p, heads), 2e-3 if flash else 1e-5)  # flash: K/V rounded to f16


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_layer_matches_torch(cpu, norm_first):
    torch = pytest.importorskip("torch")
    d, heads, ff, n = 48, 4, 80, 29
    layer = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                             norm_first=norm_first).eval()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.3)
    sd = {k: v.numpy() for k, v in layer.state_dict().items()}
    w_in, b_in = np.split(sd["self_attn.in_proj_weight"], 3), np.split(sd["self_attn.in_proj_bias"], 3)
    arrays = {"q.w": w_in[0], "q.b": b_in[0], "k.w": w_in[1], "k.b": b_in[1], "v.w": w_in[2], "v.b": b_in[2],
              "o.w": sd["self_attn.out_proj.weight"], "o.b": sd["self_attn.out_proj.bias"],
              "ln1.w": sd["norm1.weight"], "ln1.b": sd["norm1.bias"], "ln2.w": sd["norm2.weight"],
              "ln2.b": sd["norm2.bias"], "up.w": sd["linear1.weight"], "up.b": sd["linear1.bias"],
              "down.w": sd["linear2.weight"], "down.b": sd["linear2.bias"]}
    names = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_out": "o", "ln1": "ln1", "ln2": "ln2",
             "ffn_up": "up", "ffn_down": "down"}
    x = rand(n, d)

    def build(b, W, t):
        params = {part: (W[f"{s}.w"], W[f"{s}.b"]) for part, s in names.items()}
        return b.transformer_layer(t["x"], params, n_head=heads, eps=1e-5, act="relu", norm_first=norm_first)

    out, graph = run_graph(cpu, arrays, build, {"x": x})
    with torch.no_grad():
        ref = layer(torch.from_numpy(x)[None])[0].numpy()
    close(out, ref)
    assert graph.n_nodes > 10


def test_concat_and_rows(cpu):
    a, c = rand(2, 6), rand(5, 6)

    def build(b, W, t):
        joined = b.concat(t["a"], t["c"], 1)      # CLS-style: a's rows first
        return b.rows(joined, 1, 4)

    out, _ = run_graph(cpu, {}, build, {"a": a, "c": c})
    close(out, np.concatenate([a, c])[1:5])


def test_graph_is_reused_across_runs(cpu):
    w = rand(8, 16)
    weights = Weights(cpu, {"w": RawTensor.from_numpy(w)})
    b = GraphBuilder()
    graph = CompiledGraph(cpu, b, b.linear(b.input("x", (16, 3)), weights["w"]))
    try:
        size = graph.compute_bytes
        for seed in range(3):
            x = np.random.default_rng(seed).standard_normal((3, 16)).astype(np.float32)
            close(graph.run({"x": x}), x @ w.T)
        assert graph.compute_bytes == size
        with pytest.raises(RuntimeFailure, match="bytes"):
            graph.run({"x": np.zeros((4, 16), np.float32)})
        with pytest.raises(RuntimeFailure, match="not given"):
            graph.run({})
    finally:
        graph.close()
        weights.close()


def test_weight_size_mismatch_is_refused(cpu):
    with pytest.raises(InvalidModelError, match="needs"):
        Weights(cpu, {"w": RawTensor(ggml.GGML_TYPE_F32, (4, 4), np.zeros(15, np.float32))})


def test_devices_include_the_cpu():
    devices = available_devices()
    assert any(d.kind == "cpu" for d in devices)
    assert Backend("auto", n_threads=1).name in {d.name for d in devices}


def _amx_offered(backend):
    from edgevlm import amx_guard

    if amx_guard.amx_guard_active():
        return []
    return [b for b in backend.extra_buffer_types() if b.name == "AMX"]


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_batched_linear_through_the_extra_buffer_types(cpu, kind):
    """x [in, n, batch] against a weight in the CPU's extra buffer types (AMX where it is usable): ggml's AMX
    kernels read one contiguous batch, so the builder hands them [in, n * batch]."""
    from gguf import GGMLQuantizationType, quants

    w, x = rand(64, 128), rand(3, 5, 128)
    if kind == "f16":
        raw, dense = RawTensor.from_numpy(w.astype(np.float16)), w.astype(np.float16).astype(np.float32)
    else:
        q = quants.quantize(w, GGMLQuantizationType.Q8_0)
        raw, dense = RawTensor(ggml.GGML_TYPE_Q8_0, (128, 64), q), quants.dequantize(q, GGMLQuantizationType.Q8_0)
    weights = Weights(cpu, {"w": raw}, matmul={"w"}, extra=cpu.extra_buffer_types())
    b = GraphBuilder()
    graph = CompiledGraph(cpu, b, b.linear(b.input("x", (128, 5, 3)), weights["w"]))
    try:
        out = graph.run({"x": x})
    finally:
        graph.close()
        weights.close()
    close(out.reshape(3, 5, 64), x @ dense.reshape(64, 128).T, 2e-2)


def test_rows_of_one_block_stay_out_of_the_amx_buffer_type(cpu):
    from gguf import GGMLQuantizationType, quants

    amx = _amx_offered(cpu)
    if not amx:
        pytest.skip("ggml's AMX buffer type is not used here")
    w, x = rand(32, 32), rand(96, 32)
    q = quants.quantize(w, GGMLQuantizationType.Q8_0)
    weights = Weights(cpu, {"w": RawTensor(ggml.GGML_TYPE_Q8_0, (32, 32), q),
                            "w2": RawTensor(ggml.GGML_TYPE_Q8_0, (64, 32), quants.quantize(rand(32, 64),
                                                                                     GGMLQuantizationType.Q8_0))},
                      matmul={"w", "w2"}, extra=amx)
    try:
        assert weights.placement == {"w": "CPU", "w2": "AMX"}
        out = linear_once(cpu, weights["w"], x)
    finally:
        weights.close()
    close(out, x @ quants.dequantize(q, GGMLQuantizationType.Q8_0).reshape(32, 32).T, 2e-2)


def test_an_f16_input_through_the_extra_buffer_types(cpu):
    """ggml's AMX kernels read x as f32 whatever its type: the builder hands them f32."""
    w, x = rand(64, 128).astype(np.float16), rand(8, 128)
    weights = Weights(cpu, {"w": RawTensor.from_numpy(w)}, matmul={"w"}, extra=cpu.extra_buffer_types())
    b = GraphBuilder()
    x16 = b.g.ggml_cast(b.ctx, b.input("x", (128, 8)), ggml.GGML_TYPE_F16)
    graph = CompiledGraph(cpu, b, b.linear(x16, weights["w"]))
    try:
        out = graph.run({"x": x})
    finally:
        graph.close()
        weights.close()
    ref = x.astype(np.float16).astype(np.float32) @ w.astype(np.float32).T
    close(out, ref, 1e-3)


# ---------------------------------------------------------------------------- cancelling a compute
def _chain(cpu, depth):
    """A graph of ``depth`` linear layers (one node each at least) on a 16-wide input."""
    w = rand(16, 16, scale=0.1)
    weights = Weights(cpu, {"w": RawTensor.from_numpy(w)})
    b = GraphBuilder()
    x = b.input("x", (16, 4))
    out = x
    for _ in range(depth):
        out = b.linear(out, weights["w"])
    return CompiledGraph(cpu, b, out), weights, w


def test_a_cancel_check_stops_a_compute_between_nodes_and_is_removed_after(cpu, capfd):
    """ggml returns ABORTED only when it stopped before the last node: the error proves a stop mid-graph."""
    from edgevlm.errors import ComputeCancelled

    graph, weights, w = _chain(cpu, 2000)
    x = rand(4, 16)
    expected = x
    for _ in range(2000):
        expected = expected @ w.T
    try:
        graph.set_inputs({"x": x})
        with pytest.raises(ComputeCancelled, match="cancelled"):
            graph.compute(cancelled=lambda: True)
        asked = []
        graph.compute(cancelled=lambda: asked.append(1) or False)  # asked while it runs, never stops
        assert asked, "the check was never asked"
        close(graph.output_array(), expected)
        graph.run({"x": x})                      # no hook left installed from before
        close(graph.output_array(), expected)
        with pytest.raises(ComputeCancelled):    # a check that raises stops the compute, silently
            graph.compute(cancelled=lambda: 1 / 0)
        assert capfd.readouterr().err == ""
    finally:
        graph.close()
        weights.close()


def test_the_hook_is_c_code_reading_a_flag_that_a_watcher_sets():
    """ggml's compute threads never call into Python (no GIL wait per node): the hook is libc's
    strlen on the flag, which reads 0 until the check is true and 1 after."""
    import ctypes
    import threading

    from edgevlm.kernels import abort

    hook = abort.byte_flag_hook()
    assert hook is not None
    read = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)(hook)
    turned = threading.Event()
    with abort.watched_flag(turned.is_set) as flag:
        assert read(flag) is False
        turned.set()
        for _ in range(200):
            if read(flag):
                break
            threading.Event().wait(abort.POLL_S / 4)
        assert read(flag) is True
