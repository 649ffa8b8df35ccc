"""Zero-init attention on ViT and RoBERTa (docs/method.md and docs/encoders.md), on tiny random backbones:
exactly the backbone at gate 0, only the adapter learns, torchvision's ViT layout, adapter files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from adapter.backbones.adapted import (
    AdaptedRoberta,
    AdaptedViT,
    EncoderAdapter,
    EncoderAdapterConfig,
    EncoderAdapterFileError,
    adapt_roberta,
    adapt_vit,
    load_encoder_adapter,
    read_encoder_metadata,
    roberta_spec,
    save_encoder_adapter,
    vit_spec,
)
from adapter.backbones.roberta import load_roberta, load_roberta_tokenizer, save_random_roberta
from adapter.backbones.vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VisionTransformer,
    ViTShape,
    ViTWeightsError,
    load_vit,
    preprocess_images,
    save_random_vit,
)

SHAPE = ViTShape(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)
LABELS = ["dark", "bright"]
CONFIG = EncoderAdapterConfig(prompt_len=3, layers=2)
TEXTS = ["what is the answer ?", "the answer is 42 .", "where did the cat sit ?", "the cat sat on the mat ."]


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    return save_random_vit(tmp_path_factory.mktemp("vit") / "vit.safetensors", SHAPE)


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory):
    return save_random_roberta(
        tmp_path_factory.mktemp("roberta") / "roberta", TEXTS, hidden_size=32, num_layers=2, num_heads=2, max_length=32
    )


@pytest.fixture
def vit(vit_file):
    return load_vit(vit_file, SHAPE)


@pytest.fixture
def roberta(roberta_folder):
    return load_roberta(roberta_folder)


@pytest.fixture
def qa_batch(roberta_folder):
    """Two question/context pairs of different lengths: the second row is padded."""
    tok = load_roberta_tokenizer(roberta_folder)
    enc = tok(["what is the answer ?", "where ?"], ["the answer is 42 .", "mat"], padding=True, return_tensors="pt")
    assert (enc.attention_mask == 0).any()
    return enc.input_ids, enc.attention_mask


def _images(n: int = 5) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, SHAPE.image_size, SHAPE.image_size)


def _set_gates(model, value: float) -> None:
    with torch.no_grad():
        model.adapter.prompts.gate.fill_(value)


# --- ViT: torchvision's layout ------------------------------------------------------------------
def test_vit_state_dict_keys_are_torchvisions():
    per_layer = [
        "ln_1.weight",
        "ln_1.bias",
        "self_attention.in_proj_weight",
        "self_attention.in_proj_bias",
        "self_attention.out_proj.weight",
        "self_attention.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.3.weight",
        "mlp.3.bias",
    ]
    expected = (
        ["class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"]
        + [f"encoder.layers.encoder_layer_{i}.{k}" for i in range(2) for k in per_layer]
        + ["encoder.ln.weight", "encoder.ln.bias", "heads.head.weight", "heads.head.bias"]
    )
    state = VisionTransformer(SHAPE).state_dict()
    assert list(state) == expected
    assert state["encoder.pos_embedding"].shape == (1, (8 // 4) ** 2 + 1, 16)
    assert state["class_token"].shape == (1, 1, 16)
    assert state["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"].shape == (48, 16)


def test_vit_b_16_preset_has_torchvisions_numbers():
    s = ViTShape.vit_b_16()
    assert (s.image_size, s.patch_size, s.num_layers, s.num_heads, s.hidden_dim, s.mlp_dim, s.num_classes) == (
        224,
        16,
        12,
        12,
        768,
        3072,
        1000,
    )
    with torch.device("meta"):
        n = sum(p.numel() for p in VisionTransformer(s).parameters())
    assert n == 86_567_656  # torchvision's documented vit_b_16 parameter count


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vit_state_dict_file_round_trips(tmp_path, suffix):
    torch.manual_seed(0)
    ref = VisionTransformer(SHAPE).eval()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
    model = load_vit(path, SHAPE)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with torch.no_grad():
        assert torch.equal(model(_images()), ref(_images()))


def test_vit_legacy_mlp_key_names_load(tmp_path):
    """Older torchvision checkpoints say mlp.linear_1 / mlp.linear_2; torchvision renames them on load."""
    state = VisionTransformer(SHAPE).state_dict()
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in state.items()}
    torch.save(legacy, tmp_path / "old.pth")
    assert torch.equal(
        load_vit(tmp_path / "old.pth", SHAPE).encoder.layers[1].mlp[3].weight,
        state["encoder.layers.encoder_layer_1.mlp.3.weight"],
    )


def test_vit_wrong_keys_are_refused_by_name(tmp_path):
    state = VisionTransformer(SHAPE).state_dict()
    state.pop("encoder.ln.bias")
    state["encoder.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        ViTWeightsError,
        match=r"bad\.pth.*missing keys \['encoder\.ln\.bias'\].*unexpected keys "
        r"\['encoder\.extra'\]",
    ):
        load_vit(tmp_path / "bad.pth", SHAPE)


def test_vit_other_shape_is_refused(vit_file):
    with pytest.raises(ViTWeightsError, match="mlp.0.weight"):
        load_vit(vit_file, SHAPE.model_copy(update={"mlp_dim": 64}))


def test_vit_pth_is_never_unpickled(tmp_path):
    torch.save({"conv_proj.weight": torch.zeros(1), "payload": Image.new("RGB", (1, 1))}, tmp_path / "evil.pth")
    with pytest.raises(ViTWeightsError, match="evil.pth"):
        load_vit(tmp_path / "evil.pth", SHAPE)


def test_preprocess_resizes_crops_and_normalises():
    gray = Image.new("RGB", (40, 30), (128, 128, 128))
    px = preprocess_images([gray, gray.convert("L")], SHAPE)
    assert px.shape == (2, 3, 8, 8)
    want = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(px[:, :, 4, 4], want.expand(2, 3), atol=1e-6)


# --- zero init: exactly the backbone --------------------------------------------------------------
def test_zero_gates_give_the_plain_vit_exactly(vit):
    model = adapt_vit(vit, CONFIG, LABELS)
    x = _images(5)
    with torch.no_grad():
        assert torch.equal(model.features(x), vit.features(x))
        assert torch.equal(model.logits(x), model.adapter.head(vit.features(x)))
    # With autograd recording, torch's MultiheadAttention picks its fused kernel only for inputs
    # that need no grad; given the same kernel (input requiring grad) the outputs are equal too.
    x.requires_grad_()
    assert torch.equal(model.features(x), vit.features(x))


def test_zero_gates_give_the_plain_roberta_exactly(roberta, qa_batch):
    ids, mask = qa_batch
    model = adapt_roberta(roberta, CONFIG)
    plain = roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(model.hidden(ids, mask), plain)
    with torch.no_grad():
        assert torch.equal(model.hidden(ids, mask), plain)


def test_nonzero_gates_change_the_outputs(vit, roberta, qa_batch):
    v, r = adapt_vit(vit, CONFIG, LABELS), adapt_roberta(roberta, CONFIG)
    _set_gates(v, 0.5), _set_gates(r, 0.5)
    with torch.no_grad():
        assert not torch.allclose(v.features(_images()), vit.features(_images()))
        assert not torch.allclose(r.hidden(*qa_batch), roberta(*qa_batch).last_hidden_state)


# --- training: only the adapter learns ------------------------------------------------------------
def _train(model, batch, steps: int = 3):
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model.loss(*batch).backward()
        opt.step()
    return model


@pytest.mark.parametrize("kind", ["vit", "roberta"])
def test_only_prompts_gates_and_head_train_and_the_backbone_stays_bit_identical(kind, vit, roberta, qa_batch):
    if kind == "vit":
        backbone, model = vit, adapt_vit(vit, CONFIG, LABELS)
        batch, plain = (_images(4), torch.tensor([0, 1, 0, 1])), (lambda: vit.features(_images(4)))
        out = lambda: model.features(_images(4))  # noqa: E731
    else:
        backbone, model = roberta, adapt_roberta(roberta, CONFIG)
        batch = (*qa_batch, torch.tensor([6, 0]), torch.tensor([8, 0]))
        plain = lambda: roberta(*qa_batch).last_hidden_state  # noqa: E731
        out = lambda: model.hidden(*qa_batch)  # noqa: E731
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter.prompts.prompt", "adapter.prompts.gate", "adapter.head.weight", "adapter.head.bias"}
    _train(model, batch)
    assert not backbone.training and model.adapter.training  # the backbone stays in eval mode
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    after = backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (model.adapter.prompts.gate != 0).all()
    with torch.no_grad():
        assert not torch.allclose(out(), plain())


def test_fixed_one_gate_is_not_trained_and_changes_outputs_at_init(vit):
    model = adapt_vit(vit, CONFIG.model_copy(update={"gate": "fixed-one"}), LABELS)
    gate = model.adapter.prompts.gate
    assert not gate.requires_grad and torch.equal(gate, torch.ones_like(gate))
    assert all(p is not gate for p in model.trainable_parameters())
    with torch.no_grad():
        assert not torch.allclose(model.features(_images()), vit.features(_images()))
    _train(model, (_images(4), torch.tensor([0, 1, 0, 1])))
    assert torch.equal(gate, torch.ones_like(gate)) and gate.grad is None


def test_linear_probe_trains_the_head_alone(vit):
    model = adapt_vit(vit, CONFIG.model_copy(update={"gate": "linear-probe"}), LABELS)
    assert model.adapter.prompts is None
    assert {n for n, _ in model.adapter.named_parameters()} == {"head.weight", "head.bias"}
    with torch.no_grad():
        assert torch.equal(model.features(_images()), vit.features(_images()))


def test_adapted_layers_are_the_top_ones_clamped_to_the_depth(vit):
    assert list(adapt_vit(vit, CONFIG.model_copy(update={"layers": 1}), LABELS).adapter.adapted_layers) == [1]
    deep = adapt_vit(vit, CONFIG.model_copy(update={"layers": 40}), LABELS).adapter
    assert list(deep.adapted_layers) == [0, 1] and deep.prompts.prompt.shape == (2, 3, 16)
    assert deep.prompts.gate.shape == (2, 2)


def test_vit_learns_brightness_well_above_chance(vit):
    torch.manual_seed(0)

    def batch(n):
        y = torch.randint(0, 2, (n,))
        x = torch.randn(n, 3, 8, 8) * 0.3 + (y * 2.0 - 1.0)[:, None, None, None] * 0.5
        return x, y

    model = adapt_vit(vit, EncoderAdapterConfig(prompt_len=4, layers=2), LABELS)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-2)
    model.train()
    for _ in range(40):
        x, y = batch(32)
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    x, y = batch(200)
    with torch.no_grad():
        accuracy = (model.logits(x).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.85


def test_qa_head_learns_a_synthetic_span(roberta):
    """The answer runs from the one `start` token to the one `end` token in a row of random tokens."""
    torch.manual_seed(0)
    vocab, length = roberta.config.vocab_size, 12
    first_word, start_tok, end_tok = 5, vocab - 2, vocab - 1

    def batch(n):
        ids = torch.randint(first_word, vocab - 2, (n, length))
        ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
        s = torch.randint(1, length - 4, (n,))
        e = s + torch.randint(1, 3, (n,))
        ids[torch.arange(n), s], ids[torch.arange(n), e] = start_tok, end_tok
        return ids, torch.ones_like(ids), s, e

    model = adapt_roberta(roberta, EncoderAdapterConfig(prompt_len=4, layers=2))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model.loss(*batch(32)).backward()
        opt.step()
    ids, mask, s, e = batch(100)
    with torch.no_grad():
        start, end = model.span_logits(ids, mask)
    exact = ((start.argmax(-1) == s) & (end.argmax(-1) == e)).float().mean().item()
    assert exact > 0.9


def test_qa_loss_ignores_positions_outside_the_input(roberta, qa_batch):
    model = adapt_roberta(roberta, CONFIG)
    ids, mask = qa_batch
    outside = torch.full((2,), ids.shape[1] + 5)
    one = model.loss(ids[:1], mask[:1], torch.tensor([3]), torch.tensor([4]))
    assert torch.allclose(
        model.loss(ids, mask, torch.cat([torch.tensor([3]), outside[:1]]), torch.cat([torch.tensor([4]), outside[:1]])),
        one,
        atol=1e-6,
    )


# --- adapter files --------------------------------------------------------------------------------
def _trained_vit_adapter(vit, vit_file, gate="zero-init"):
    model = adapt_vit(vit, CONFIG.model_copy(update={"gate": gate}), LABELS, weights=vit_file)
    if gate == "zero-init":
        _set_gates(model, 0.3)
    return model


@pytest.mark.parametrize("gate", ["zero-init", "fixed-one", "linear-probe"])
def test_vit_adapter_file_round_trip_is_exact(tmp_path, vit, vit_file, gate):
    model = _trained_vit_adapter(vit, vit_file, gate)
    path = save_encoder_adapter(model.adapter, tmp_path / "run", extra={"step": 7})
    assert path.name == "encoder_adapter.safetensors" and not list(path.parent.glob("*.tmp"))
    meta = read_encoder_metadata(path)
    assert meta["labels"] == LABELS and meta["task"] == "image-classification" and meta["extra"] == {"step": 7}
    assert meta["backbone"].identity["sha256"] == vit_spec(vit, vit_file).identity["sha256"]
    loaded = AdaptedViT(vit, load_encoder_adapter(tmp_path / "run", vit_spec(vit, vit_file)))
    assert loaded.adapter.config == model.adapter.config
    assert {n for n, p in loaded.adapter.named_parameters() if p.requires_grad} == {
        n for n, p in model.adapter.named_parameters() if p.requires_grad
    }
    with torch.no_grad():
        assert torch.equal(loaded.logits(_images()), model.logits(_images()))


def test_roberta_adapter_file_round_trip_is_exact(tmp_path, roberta, roberta_folder, qa_batch):
    model = adapt_roberta(roberta, CONFIG, roberta_folder)
    _set_gates(model, -0.4)
    save_encoder_adapter(model.adapter, tmp_path / "qa.safetensors")
    loaded = AdaptedRoberta(
        roberta, load_encoder_adapter(tmp_path / "qa.safetensors", roberta_spec(roberta, roberta_folder))
    )
    with torch.no_grad():
        for a, b in zip(loaded.span_logits(*qa_batch), model.span_logits(*qa_batch)):
            assert torch.equal(a, b), (a - b).abs().max()


def test_adapter_for_another_backbone_kind_is_refused(tmp_path, vit, roberta, vit_file):
    path = save_encoder_adapter(_trained_vit_adapter(vit, vit_file).adapter, tmp_path)
    with pytest.raises(EncoderAdapterFileError, match="an adapter for a vit backbone, not a roberta"):
        load_encoder_adapter(path, roberta_spec(roberta))
    with pytest.raises(ValueError, match="built for a vit"):
        AdaptedRoberta(roberta, load_encoder_adapter(path, vit_spec(vit)))


def test_adapter_for_another_shape_is_refused(tmp_path, vit, vit_file):
    path = save_encoder_adapter(_trained_vit_adapter(vit, vit_file).adapter, tmp_path)
    other = VisionTransformer(SHAPE.model_copy(update={"num_layers": 3}))
    with pytest.raises(EncoderAdapterFileError, match="num_layers: adapter 2 vs backbone 3"):
        load_encoder_adapter(path, vit_spec(other))


def test_adapter_for_other_weights_is_refused(tmp_path, vit, vit_file):
    path = save_encoder_adapter(_trained_vit_adapter(vit, vit_file).adapter, tmp_path / "a")
    other = save_random_vit(tmp_path / "other.safetensors", SHAPE, seed=1)
    with pytest.raises(EncoderAdapterFileError, match="not 'other.safetensors'"):
        load_encoder_adapter(path, vit_spec(load_vit(other, SHAPE), other))


def test_corrupt_truncated_and_pickled_files_are_refused(tmp_path, vit, vit_file):
    path = save_encoder_adapter(_trained_vit_adapter(vit, vit_file).adapter, tmp_path / "good")
    data = path.read_bytes()
    spec = vit_spec(vit, vit_file)
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    torch.save({"prompts.prompt": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    for name, why in [("cut", "truncated"), ("junk", "corrupt"), ("pickle", "pickle")]:
        with pytest.raises(EncoderAdapterFileError, match=f"{name}.safetensors.*{why}"):
            load_encoder_adapter(tmp_path / f"{name}.safetensors", spec)
    with pytest.raises(EncoderAdapterFileError, match="not found"):
        load_encoder_adapter(tmp_path / "missing.safetensors", spec)


def test_llama_adapter_file_is_refused(tmp_path, vit):
    from adapter.adapter import AdapterConfig, AdaptionPrompts
    from adapter.adapter_file import save_adapter
    from adapter.model_args import ModelArgs

    args = ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32)
    path = save_adapter(AdaptionPrompts(args, AdapterConfig(2, 2)), args, tmp_path / "llama")
    with pytest.raises(EncoderAdapterFileError, match="a LLaMA adapter file"):
        load_encoder_adapter(path, vit_spec(vit))


def test_classification_needs_labels(vit):
    with pytest.raises(ValueError, match="labels"):
        EncoderAdapter(vit_spec(vit), CONFIG)
