"""The adapter store: layouts, single-flight loads, size cap, and malformed files named by the
adapter, never by a path on the server (no Ray: the store is plain Python)."""

import concurrent.futures as cf
import json
import struct

import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import AdapterFileError, save_adapter
from adapter.model_args import preset
from serve.adapters import AdapterStore, InvalidAdapterName, UnknownAdapter


def _save(args, path, k=3, seed=0):
    torch.manual_seed(seed)
    save_adapter(AdaptionPrompts(args, AdapterConfig(k, 2)), args, path)


def _raw(path, header: dict, data: bytes = b""):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.fixture
def root(tmp_path, tiny_model):
    args = tiny_model.args
    _save(args, tmp_path / "run-a" / "adapter")  # a training run: <name>/adapter/adapter.safetensors
    _save(args, tmp_path / "exported")  # <name>/adapter.safetensors
    _save(args, tmp_path / "flat.safetensors")  # <name>.safetensors
    _save(args, tmp_path / "big", k=50)
    _save(preset("tiny").__class__(**{**preset("tiny").__dict__, "dim": 32}), tmp_path / "otherbase")
    meta = {"format": "llama-adapter", "base_shape": json.dumps({})}
    _raw(tmp_path / "badjson.safetensors", {"__metadata__": {**meta, "adapter_config": "{not json"}})
    _raw(tmp_path / "nokey.safetensors", {"__metadata__": {"format": "llama-adapter"}})
    _raw(tmp_path / "unknownkey.safetensors", {"__metadata__": {**meta, "adapter_config": json.dumps({"colour": 1})}})
    _raw(tmp_path / "lenzero.safetensors", {"__metadata__": {**meta, "adapter_config": json.dumps({"adapter_len": 0})}})
    _raw(tmp_path / "listheader.safetensors", {"__metadata__": [1]})
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    good = (tmp_path / "flat.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    # Finite-looking file with NaN prompts.
    p = AdaptionPrompts(args, AdapterConfig(3, 2))
    with torch.no_grad():
        p.prompt.fill_(float("nan"))
    save_adapter(p, args, tmp_path / "nan")
    (tmp_path / "notes.txt").write_text("not an adapter")
    return tmp_path


def test_every_layout_is_listed_and_served(root, tiny_model):
    store = AdapterStore(str(root), tiny_model)
    names = store.available()
    assert {"run-a", "exported", "flat"} <= set(names) and "notes" not in names
    for name in ("run-a", "exported", "flat"):
        assert set(store.get(name).prefixes) == {2, 3}


@pytest.mark.parametrize(
    "name,needle",
    [
        ("badjson", "bad adapter metadata"),
        ("nokey", "lacks"),
        ("unknownkey", "colour"),
        ("lenzero", "adapter_len"),
        ("listheader", "not a JSON object"),
        ("pickle", "pickle"),
        ("truncated", "truncated"),
        ("nan", "NaN"),
        ("otherbase", "different base"),
    ],
)
def test_malformed_adapter_files_are_named_without_server_paths(root, tiny_model, name, needle):
    store = AdapterStore(str(root), tiny_model)
    with pytest.raises(AdapterFileError) as e:
        store.get(name)
    message = str(e.value)
    assert needle.lower() in message.lower() and repr(name) in message
    assert str(root) not in message and str(store.cache) not in message and "/tmp" not in message


def test_concurrent_first_requests_load_once(root, tiny_model):
    store = AdapterStore(str(root), tiny_model)
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.get("run-a"), range(16)))
    assert store.loads == 1
    assert all(r is results[0] for r in results)
    assert list(store.cache.iterdir()) == []  # temp copies never linger


def test_size_cap_and_lru_and_names(root, tiny_model):
    small = AdapterStore(str(root), tiny_model, max_bytes=(root / "flat.safetensors").stat().st_size + 10)
    small.get("flat")
    with pytest.raises(AdapterFileError, match="larger than this server's limit"):
        small.get("big")
    store = AdapterStore(str(root), tiny_model, max_loaded=2)
    for n in ("run-a", "exported", "flat"):
        store.get(n)
    assert list(store.loaded) == ["exported", "flat"]
    for bad in ("../x", "a/b", ".hidden", "a\nb", "x" * 200):
        with pytest.raises(InvalidAdapterName):
            store.get(bad)
    with pytest.raises(UnknownAdapter):
        store.get("missing")


def test_images_are_offered_only_where_the_adapter_and_the_servers_encoder_match(tmp_path, tiny_model):
    from adapter.image_encoder import VisualProjection

    args = tiny_model.args
    clip = {"name": "tiny-clip", "sha256": "ab" * 32, "feature_layers": [1, 3]}
    mm = AdaptionPrompts(args, AdapterConfig(3, 2), projection=VisualProjection(8, 4, args.dim, clip))
    save_adapter(mm, args, tmp_path / "mm", extra={"task": "coco"})
    save_adapter(AdaptionPrompts(args, AdapterConfig(3, 2)), args, tmp_path / "sqa", extra={"task": "scienceqa"})
    _save(args, tmp_path / "plain")
    same = AdapterStore(str(tmp_path), tiny_model, encoder=clip)
    # Listed from the file headers, before anything is loaded.
    assert [n for n in ("mm", "sqa", "plain") if same.takes_images(n)] == ["mm"] and same.loads == 0
    loaded = same.get("mm")
    assert loaded.image_refusal is None and loaded.template == "alpaca" and loaded.prompts is not None
    with torch.no_grad():
        with_image = loaded.prefixes_for_image(tiny_model, torch.randn(1, 8))
    assert set(with_image) == set(loaded.prefixes)
    assert with_image[args.n_layers - 1].k.shape == loaded.prefixes[args.n_layers - 1].k.shape
    assert not torch.equal(with_image[args.n_layers - 1].k, loaded.prefixes[args.n_layers - 1].k)
    assert same.get("sqa").template == "raw" and "text-only adapter" in same.get("sqa").image_refusal
    other = AdapterStore(str(tmp_path), tiny_model, encoder={**clip, "sha256": "cd" * 32, "name": "other"})
    assert not other.takes_images("mm") and "trained with image encoder 'tiny-clip'" in other.get("mm").image_refusal
    none = AdapterStore(str(tmp_path), tiny_model)
    assert not none.takes_images("mm") and "no image encoder" in none.get("mm").image_refusal
