"""The restricted torch-file reader: exact values, no code execution, clear failures."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from edgevlm.convert.torch_pickle import (ModuleStandIn, TorchFunction, load_torch_file,
                                          state_dict_of)
from edgevlm.errors import ConversionError, UnsafePickleError


class _StorageRef:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Pickler(pickle.Pickler):
    """Writes storages the way torch.save does: ('storage', type, key, location, numel)."""

    def persistent_id(self, obj: object) -> object:
        import torch

        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def write_torch_archive(path: Path, obj: object = None, storages: dict | None = None,
                        pickle_bytes: bytes | None = None) -> Path:
    """A torch.save-style zip holding ``obj`` (or raw ``pickle_bytes``) and raw storages."""
    if pickle_bytes is None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        pickle_bytes = buf.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


class _Call:
    """Pickles as ``func(*args)``."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _torch_state(path: Path) -> dict[str, np.ndarray]:
    import torch

    obj = torch.load(path, weights_only=False)
    state = obj if isinstance(obj, dict) else obj.state_dict()
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items()}


def test_reads_the_pickled_module_exactly(omnifusion_checkpoint):
    release, _ = omnifusion_checkpoint
    obj = load_torch_file(release / "projection.pt")
    assert isinstance(obj, ModuleStandIn) and obj.qualified_name == "models.VisualToGPTMapping"
    layer = obj.child("transformer_layer")
    assert layer.qualified_name == "torch.nn.modules.transformer.TransformerEncoderLayer"
    assert layer.state["norm_first"] is False
    assert layer.state["activation"] == TorchFunction("torch.nn.functional.relu", "relu")
    assert layer.child("self_attn").state["num_heads"] == 4
    assert layer.child("self_attn").state["batch_first"] is True
    assert layer.child("norm1").state["eps"] == 1e-5
    ours, ref = state_dict_of(obj), _torch_state(release / "projection.pt")
    assert list(ours) == list(ref)
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_reads_a_plain_state_dict_of_many_dtypes(tmp_path):
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = OrderedDict([
        ("f32", torch.randn(3, 5)), ("f16", torch.randn(7).half()),
        ("bf16", torch.randn(2, 3).to(torch.bfloat16)), ("f64", torch.randn(3).double()),
        ("i64", torch.arange(-3, 3)), ("i32", torch.arange(5, dtype=torch.int32)),
        ("u8", torch.arange(9, dtype=torch.uint8)), ("bool", torch.tensor([True, False, True])),
        ("transposed", base.t()), ("offset_view", base[1:, 2:5]), ("empty", torch.zeros(0, 4)),
        ("scalar", torch.tensor(2.5)),
    ])
    torch.save(state, tmp_path / "state.pt")
    ours = state_dict_of(load_torch_file(tmp_path / "state.pt"))
    assert list(ours) == list(state)
    for name, value in _torch_state(tmp_path / "state.pt").items():
        assert ours[name].shape == value.shape, name
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert ours["bf16"].dtype == np.float32 and ours["u8"].dtype == np.uint8


def test_bf16_special_embeddings_read_exactly(omnifusion_checkpoint):
    release, _ = omnifusion_checkpoint
    ours = load_torch_file(release / "special_embeddings.pt")
    ref = _torch_state(release / "special_embeddings.pt")
    assert sorted(ours) == ["BOT", "EOI", "SOI", "USER"]
    for key, value in ref.items():
        assert ours[key].dtype == np.float32 and ours[key].shape == (128,)
        np.testing.assert_array_equal(ours[key], value)


def _assert_refused(path: Path, needle: str) -> None:
    with pytest.raises(UnsafePickleError) as info:
        load_torch_file(path)
    message = str(info.value)
    assert needle in message and str(path) in message
    assert "refused" in message and "not executed" in message


@pytest.mark.parametrize("how", ["torch.save", "handwritten"])
def test_os_system_is_refused_and_not_run(tmp_path, how):
    import torch

    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "torch.save":  # pickled as posix.system on Linux
        torch.save({"w": _Call(os.system, f"touch {sentinel}")}, path)
    else:
        write_torch_archive(path, pickle_bytes=f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode())
    _assert_refused(path, "os.system")
    assert not sentinel.exists()


def test_eval_and_popen_are_refused(tmp_path):
    import torch

    sentinel = tmp_path / "pwned"
    torch.save(_Call(eval, f"open({str(sentinel)!r}, 'w')"), tmp_path / "eval.pt")
    _assert_refused(tmp_path / "eval.pt", "builtins.eval")
    torch.save([_Call(subprocess.Popen, ["touch", str(sentinel)])], tmp_path / "popen.pt")
    _assert_refused(tmp_path / "popen.pt", "subprocess.Popen")
    assert not sentinel.exists()


def test_torch_classes_outside_the_table_are_refused(tmp_path):
    import torch

    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp_path / "seq.pt")
    _assert_refused(tmp_path / "seq.pt", "torch.nn.modules.container.Sequential")


def test_user_class_called_with_arguments_is_refused(tmp_path):
    path = write_torch_archive(tmp_path / "args.pt",
                               pickle_bytes=b"cmodels\nVisualToGPTMapping\n(I1\ntR.")
    _assert_refused(path, "models.VisualToGPTMapping")


@pytest.mark.parametrize("numel,offset,exc,needle", [
    (4, 2, UnsafePickleError, "_rebuild_tensor_v2"),  # a view past the storage's end
    (10, 0, ConversionError, "truncated or corrupt"),  # declared storage larger than its bytes
])
def test_bad_storage_references(tmp_path, numel, offset, exc, needle):
    import torch

    view = _Call(torch._utils._rebuild_tensor_v2, _StorageRef("0", numel), offset, (4,), (1,),
                 False, OrderedDict())
    path = write_torch_archive(tmp_path / "bad.pt", {"w": view},
                               {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(exc, match=needle):
        load_torch_file(path)


def test_truncated_file(omnifusion_checkpoint, tmp_path):
    release, _ = omnifusion_checkpoint
    data = (release / "projection.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt") as info:
        load_torch_file(tmp_path / "cut.pt")
    assert not isinstance(info.value, UnsafePickleError)


def test_not_a_zip_and_legacy_format(tmp_path):
    import torch

    (tmp_path / "junk.pt").write_bytes(b"GGUF and other things")
    with pytest.raises(ConversionError, match="not a torch.save file"):
        load_torch_file(tmp_path / "junk.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match=r"legacy.*torch>=1\.6"):
        load_torch_file(tmp_path / "old.pt")
    with pytest.raises(ConversionError, match="does not exist"):
        load_torch_file(tmp_path / "missing.pt")


def test_missing_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "nodata.pt", "w") as archive:
        archive.writestr("archive/data/0", b"\0" * 8)
    with pytest.raises(ConversionError, match="data.pkl"):
        load_torch_file(tmp_path / "nodata.pt")


def test_reader_and_converter_work_without_torch(omnifusion_checkpoint, tmp_path):
    """torch made unimportable: the .pt files still load and the release converts."""
    release, tower = omnifusion_checkpoint
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgevlm.convert import convert\n"
        f"r = convert({str(release)!r}, {str(tmp_path / 'out')!r}, quant='f16',\n"
        f"            vision_tower={str(tower)!r})\n"
        "assert r.mmproj_path.is_file() and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
