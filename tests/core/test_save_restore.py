"""Save/restore: JSON attributes + safetensors, no pickle, atomic writes, bit-exact on a fresh model."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from core_models import SmallCNN, TinyTransformer, make_tiny_llama
from torch import nn

import quant_core as mtq
from quant_core.nn import QuantLinear

W4A8_MAX = {**mtq.W4A8_AWQ_BETA_CFG.copy(), "algorithm": "max"}  # AWQ needs >= 128 input features
CONFIGS = [
    "INT8_SMOOTHQUANT_CFG",
    "W4A8_MAX",
    "NVFP4_DEFAULT_CFG",
    "FP8_PER_CHANNEL_PER_TOKEN_CFG",
    "MXFP4_DEFAULT_CFG",
]


def fresh_transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer().eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_restore_on_a_fresh_model_reproduces_outputs_bit_for_bit(name, tokens, tmp_path):
    model = fresh_transformer()
    config = W4A8_MAX if name == "W4A8_MAX" else getattr(mtq, name)
    mtq.quantize(model, config, lambda m: [m(t) for t in tokens])
    path = tmp_path / "quantized.safetensors"
    mtq.save(model, path)

    restored = mtq.restore(fresh_transformer(), path)

    assert type(restored.fc1) is QuantLinear and type(restored.attn.bmm) is type(model.attn.bmm)
    assert type(restored.fc1.weight_quantizer) is type(model.fc1.weight_quantizer)
    for t in tokens:
        assert torch.equal(restored(t), model(t))
    assert [p.name for p in tmp_path.iterdir()] == ["quantized.safetensors"]  # no temp files left


def test_saved_file_is_safetensors_with_json_metadata_and_no_pickle(tokens, tmp_path):
    model = mtq.quantize(fresh_transformer(), mtq.INT8_DEFAULT_CFG, lambda m: m(tokens[0]))
    path = tmp_path / "m.safetensors"
    mtq.save(model, path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    state = json.loads(header["__metadata__"]["quant_core"])
    assert state["quantizers"]["fc1.input_quantizer"]["attributes"]["num_bits"] == 8
    assert "fc1.input_quantizer._amax" in header
    assert b"\x80\x04\x95" not in raw and b"torch._utils" not in raw  # no pickle stream


def test_save_to_missing_folder_fails_before_writing(tokens, tmp_path):
    model = mtq.quantize(fresh_transformer(), mtq.INT8_DEFAULT_CFG, lambda m: m(tokens[0]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mtq.save(model, tmp_path / "nope" / "m.safetensors")


def test_quantizer_state_round_trips_through_torch_save_weights_only(tokens):
    model = mtq.quantize(fresh_transformer(), W4A8_MAX, lambda m: [m(t) for t in tokens])
    buffer = io.BytesIO()
    torch.save({"quant": mtq.quantizer_state(model), "weights": model.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = mtq.restore_quantizer_state(fresh_transformer(), loaded["quant"])
    fresh.load_state_dict(loaded["weights"])
    assert torch.equal(fresh(tokens[2]), model(tokens[2]))


def test_restore_needs_the_same_user_registration(tokens, tmp_path):
    class QuantLayerNorm(nn.LayerNorm):
        def _setup(self):
            self.input_quantizer = mtq.TensorQuantizer()

        def forward(self, x):
            return super().forward(self.input_quantizer(x))

    mtq.register(original_cls=nn.LayerNorm, quantized_cls=QuantLayerNorm)
    try:
        model = mtq.quantize(fresh_transformer(), mtq.INT8_DEFAULT_CFG, lambda m: m(tokens[0]))
        mtq.save(model, tmp_path / "m.safetensors")
        restored = mtq.restore(fresh_transformer(), tmp_path / "m.safetensors")
        assert type(restored.norm) is QuantLayerNorm
        assert torch.equal(restored(tokens[1]), model(tokens[1]))
    finally:
        mtq.unregister(nn.LayerNorm)
    with pytest.raises(ValueError, match=r"'norm' \(LayerNorm\) has no registered quantized class"):
        mtq.restore(fresh_transformer(), tmp_path / "m.safetensors")


def test_restore_rejects_a_file_not_written_by_save(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"not written by quant_core\.save"):
        mtq.restore(SmallCNN(), tmp_path / "plain.safetensors")


def test_tiny_llama_with_tied_embeddings_round_trips(tmp_path):
    model = make_tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, mtq.INT4_AWQ_CFG, lambda m: m(ids))
    mtq.save(model, tmp_path / "llama.safetensors")
    fresh = make_tiny_llama()
    fresh.config.tie_word_embeddings = True
    fresh.tie_weights()
    mtq.restore(fresh, tmp_path / "llama.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


class _WithExtraState(nn.Module):
    """A linear whose ``get_extra_state`` returns ``extra`` and which records what restore hands back."""

    def __init__(self, extra):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.extra = extra
        self.received = "never set"

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.received = state

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize(
    "extra",
    [
        None,
        b"\x00te\xff",
        b"",
        io.BytesIO(b"fp8 meta"),
        {"step": 3, "recipe": ["delayed", 1.5]},
        torch.arange(3.0),
    ],
    ids=["none", "bytes", "empty-bytes", "bytesio", "json", "tensor"],
)
def test_module_extra_state_round_trips_through_save_and_restore(extra, tmp_path):
    x = torch.randn(2, 4)
    model = mtq.quantize(_WithExtraState(extra), mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    mtq.save(model, tmp_path / "m.safetensors")
    fresh = mtq.restore(_WithExtraState("other"), tmp_path / "m.safetensors")
    got = fresh.received
    if isinstance(extra, io.BytesIO):
        assert isinstance(got, io.BytesIO) and got.getvalue() == extra.getvalue()
    elif isinstance(extra, torch.Tensor):
        assert torch.equal(got, extra)
    else:
        assert got == extra and type(got) is type(extra)
    assert torch.equal(fresh(x), model(x))


def test_extra_state_that_is_not_data_is_refused_by_name_and_nothing_is_written(tmp_path):
    model = mtq.quantize(_WithExtraState(object()), mtq.INT8_WEIGHT_ONLY_CFG, None)
    with pytest.raises(TypeError, match=r"'_extra_state'.*object.*never pickles"):
        mtq.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


class _SharedViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("first_row", self.fc.weight.data[0])  # another view of the weight

    def forward(self, x):
        return self.fc(x) + self.first_row.sum()


def test_buffers_viewing_part_of_a_weight_are_saved_and_restored(tmp_path):
    x = torch.randn(2, 4)
    model = mtq.quantize(_SharedViews(), mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    mtq.save(model, tmp_path / "m.safetensors")
    torch.manual_seed(123)
    fresh = mtq.restore(_SharedViews(), tmp_path / "m.safetensors")
    assert torch.equal(fresh.first_row, model.fc.weight[0]) and torch.equal(fresh(x), model(x))


def test_saved_file_gets_the_permissions_of_a_normally_written_file(tokens, tmp_path):
    import os

    model = mtq.quantize(fresh_transformer(), mtq.INT8_WEIGHT_ONLY_CFG, None)
    mtq.save(model, tmp_path / "m.safetensors")
    (tmp_path / "plain").write_text("x")
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == (
        tmp_path / "plain"
    ).stat().st_mode & 0o777
    assert os.access(tmp_path / "m.safetensors", os.R_OK)


def test_a_restore_failing_after_conversion_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    """A fault while the tensors are read (after the modules were converted) undoes the
    conversion: same classes, no quantizers, same parameters."""
    import quant_core.save_restore as save_restore

    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(4, 16)
    mtq.quantize(source, mtq.INT8_DEFAULT_CFG, lambda m: m(x))
    mtq.save(source, tmp_path / "q.safetensors")
    target = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def unreadable(_path):
        raise OSError("disk went away")

    monkeypatch.setattr(save_restore, "load_file", unreadable)
    with pytest.raises(OSError, match="disk went away"):
        mtq.restore(target, tmp_path / "q.safetensors")
    assert [type(m) for m in target] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert not any(isinstance(m, mtq.TensorQuantizer) for m in target.modules())
    after = target.state_dict()
    assert after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items()
    )
