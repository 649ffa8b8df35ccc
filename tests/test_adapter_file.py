"""Adapter files: exact round trip; anything else refused with a message that names the problem."""

import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import AdapterFileError, import_v1_adapter, load_adapter, read_metadata, save_adapter
from adapter.model_args import ModelArgs, preset

ARGS = preset("tiny")


def _prompts(cfg=AdapterConfig(4, 3)):
    torch.manual_seed(0)
    p = AdaptionPrompts(ARGS, cfg)
    with torch.no_grad():
        p.gate.normal_()
    return p


def test_round_trip_is_exact(tmp_path):
    p = _prompts()
    path = save_adapter(p, ARGS, tmp_path / "run", extra={"epoch": 3})
    assert path.name == "adapter.safetensors"
    q = load_adapter(tmp_path / "run", ARGS)
    assert torch.equal(p.prompt, q.prompt) and torch.equal(p.gate, q.gate)
    assert q.config == p.config and q.first_layer == p.first_layer
    assert read_metadata(path)["extra"] == {"epoch": 3}
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_mismatched_base_is_refused_with_the_difference(tmp_path):
    path = save_adapter(_prompts(), ARGS, tmp_path)
    other = ModelArgs.from_dict({**ARGS.to_dict(), "n_layers": 6})
    with pytest.raises(AdapterFileError, match="n_layers: adapter 4 vs base 6"):
        load_adapter(path, other)


def test_truncated_file_is_refused(tmp_path):
    path = save_adapter(_prompts(), ARGS, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_adapter(path, ARGS)
    path.write_bytes(data[:5])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_adapter(path, ARGS)


def test_pickle_file_is_refused_by_name(tmp_path):
    path = tmp_path / "adapter.safetensors"
    p = _prompts()
    torch.save({"prompt": p.prompt, "gate": p.gate}, path)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(path, ARGS)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(AdapterFileError, match="not a LLaMA-Adapter file"):
        load_adapter(path, ARGS)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(tmp_path / "nope.safetensors", ARGS)


def test_v1_import_uses_raw_gates(tmp_path):
    k, n = 3, 2
    sd = {"adapter_query.weight": torch.randn(n * k, ARGS.dim)}
    for i in range(ARGS.n_layers - n, ARGS.n_layers):
        sd[f"layers.{i}.attention.gate"] = torch.randn(1, ARGS.n_heads, 1, 1)
    torch.save(sd, tmp_path / "v1.pth")
    p = import_v1_adapter(tmp_path / "v1.pth", ARGS, adapter_len=k)
    assert p.config.gate_activation == "identity"
    assert torch.equal(p.activated_gate()[0], sd[f"layers.{ARGS.n_layers - n}.attention.gate"].reshape(-1))
    assert torch.equal(p.prompt.reshape(n * k, ARGS.dim), sd["adapter_query.weight"])


def test_malformed_headers_and_values_are_refused_by_name(tmp_path):
    import json as _json

    def raw(name, header: bytes, payload: bytes = b""):
        path = tmp_path / name
        path.write_bytes(len(header).to_bytes(8, "little") + header + payload)
        return path

    with pytest.raises(AdapterFileError, match="not a JSON object"):
        load_adapter(raw("list.safetensors", b"[1, 2]"), ARGS)
    with pytest.raises(AdapterFileError, match="not a JSON object"):
        load_adapter(raw("meta.safetensors", _json.dumps({"__metadata__": [1]}).encode()), ARGS)
    with pytest.raises(AdapterFileError, match="data_offsets"):
        load_adapter(raw("offsets.safetensors", _json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()), ARGS)
    p = _prompts()
    with torch.no_grad():
        p.prompt[0, 0, 0] = float("nan")
    save_adapter(p, ARGS, tmp_path / "nan")
    with pytest.raises(AdapterFileError, match="'prompt' holds NaN or infinite values"):
        load_adapter(tmp_path / "nan", ARGS)


def test_a_header_whose_length_starts_with_the_pickle_byte_is_still_read(tmp_path):
    """A safetensors header of 128 + 256k bytes begins with 0x80, pickle's protocol marker."""
    p = AdaptionPrompts(ARGS, AdapterConfig(adapter_len=2, adapter_layers=1))
    for pad in range(300):  # grow the header through the metadata until its length is 0x..80
        path = save_adapter(p, ARGS, tmp_path / "a.safetensors", extra={"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_metadata(path)["extra"]["note"] == "x" * pad
    assert torch.equal(load_adapter(path, ARGS).prompt, p.prompt)
