"""Zero-init attention on ViT and the BERT family (docs/method.md and docs/encoders.md), on tiny random
backbones and the real all-MiniLM-L6-v2: exactly the backbone at gate 0, only the adapter learns (or, for
full fine-tuning, the backbone too), torchvision's ViT layout, adapter files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from adapter.backbones.adapted import (
    AdaptedBertFamily,
    AdaptedViT,
    EncoderAdapter,
    EncoderAdapterConfig,
    EncoderAdapterFileError,
    adapt_bert_family,
    adapt_vit,
    bert_family_spec,
    load_encoder_adapter,
    read_encoder_metadata,
    save_encoder_adapter,
    vit_spec,
)
from adapter.backbones.bert_family import (
    load_bert_family,
    load_tokenizer,
    model_type,
    save_random_bert,
    save_random_roberta,
)
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
from tests.conftest import MINILM_SHA256, minilm_folder

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
    return load_bert_family(roberta_folder)


@pytest.fixture
def qa_batch(roberta_folder):
    """Two question/context pairs of different lengths: the second row is padded."""
    tok = load_tokenizer(roberta_folder)
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
    model = adapt_bert_family(roberta, CONFIG)
    plain = roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(model.hidden(ids, mask), plain)
    with torch.no_grad():
        assert torch.equal(model.hidden(ids, mask), plain)


def test_nonzero_gates_change_the_outputs(vit, roberta, qa_batch):
    v, r = adapt_vit(vit, CONFIG, LABELS), adapt_bert_family(roberta, CONFIG)
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
        backbone, model = roberta, adapt_bert_family(roberta, CONFIG)
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

    model = adapt_bert_family(roberta, EncoderAdapterConfig(prompt_len=4, layers=2))
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
    model = adapt_bert_family(roberta, CONFIG)
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
    model = adapt_bert_family(roberta, CONFIG, roberta_folder)
    _set_gates(model, -0.4)
    save_encoder_adapter(model.adapter, tmp_path / "qa.safetensors")
    loaded = AdaptedBertFamily(
        roberta, load_encoder_adapter(tmp_path / "qa.safetensors", bert_family_spec(roberta, roberta_folder))
    )
    with torch.no_grad():
        for a, b in zip(loaded.span_logits(*qa_batch), model.span_logits(*qa_batch)):
            assert torch.equal(a, b), (a - b).abs().max()


def test_adapter_for_another_backbone_kind_is_refused(tmp_path, vit, roberta, vit_file):
    path = save_encoder_adapter(_trained_vit_adapter(vit, vit_file).adapter, tmp_path)
    with pytest.raises(EncoderAdapterFileError, match="an adapter for a vit backbone, not a roberta"):
        load_encoder_adapter(path, bert_family_spec(roberta))
    with pytest.raises(ValueError, match="built for a vit"):
        AdaptedBertFamily(roberta, load_encoder_adapter(path, vit_spec(vit)))


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


# --- the BERT family: one wrapper for BertModel and RobertaModel, by config.json model_type -------
@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return save_random_bert(
        tmp_path_factory.mktemp("bert") / "bert", TEXTS, hidden_size=32, num_layers=2, num_heads=2, max_length=32
    )


@pytest.fixture
def bert(bert_folder):
    return load_bert_family(bert_folder)


@pytest.fixture
def bert_batch(bert_folder):
    """Two question/context pairs through the WordPiece tokenizer: segments 0 / 1, the second row padded."""
    enc = load_tokenizer(bert_folder)(
        ["what is the answer ?", "where ?"], ["the answer is 42 .", "mat"], padding=True, return_tensors="pt"
    )
    assert (enc.attention_mask == 0).any() and (enc.token_type_ids == 1).any()
    return enc.input_ids, enc.attention_mask, enc.token_type_ids


def test_the_checkpoints_model_type_picks_the_class(bert_folder, roberta_folder, tmp_path):
    from transformers import BertModel, RobertaModel

    assert type(load_bert_family(bert_folder)) is BertModel and model_type(bert_folder) == "bert"
    assert type(load_bert_family(roberta_folder)) is RobertaModel and model_type(roberta_folder) == "roberta"
    assert type(load_tokenizer(bert_folder)).__name__.startswith("BertTokenizer")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2' is not of the BERT family"):
        load_bert_family(tmp_path / "gpt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert_family(tmp_path)


def test_zero_gates_give_the_plain_bert_exactly_and_segments_reach_it(bert, bert_batch):
    ids, mask, segments = bert_batch
    model = adapt_bert_family(bert, CONFIG)
    assert model.kind == "bert" and model.adapter.spec.kind == "bert"
    plain = bert(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state
    assert torch.equal(model.hidden(ids, mask, segments), plain)
    with torch.no_grad():
        assert torch.equal(model.hidden(ids, mask, segments), plain)
        assert not torch.allclose(model.hidden(ids, mask), plain)  # BERT reads its segments
        _set_gates(model, 0.5)
        assert not torch.allclose(model.hidden(ids, mask, segments), plain)


def test_only_prompts_gates_and_head_train_on_bert_and_it_stays_bit_identical(bert, bert_batch):
    model = adapt_bert_family(bert, CONFIG)
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "adapter.prompts.prompt",
        "adapter.prompts.gate",
        "adapter.head.weight",
        "adapter.head.bias",
    }
    ids, mask, segments = bert_batch
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model.loss(ids, mask, torch.tensor([8, 0]), torch.tensor([9, 0]), segments).backward()
        opt.step()
    assert not bert.training
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())
    assert (model.adapter.prompts.gate != 0).all()


def test_a_bert_adapter_is_refused_on_a_roberta(tmp_path, bert, bert_folder, roberta):
    path = save_encoder_adapter(adapt_bert_family(bert, CONFIG, bert_folder).adapter, tmp_path / "bert")
    assert read_encoder_metadata(path)["backbone"].kind == "bert"
    with pytest.raises(EncoderAdapterFileError, match="an adapter for a bert backbone, not a roberta"):
        load_encoder_adapter(path, bert_family_spec(roberta))


# --- full fine-tuning: the reference arm ---------------------------------------------------------
def test_full_fine_tuning_trains_every_backbone_weight_without_prompts(bert, bert_batch):
    model = adapt_bert_family(bert, CONFIG.model_copy(update={"gate": "full"}))
    assert model.adapter.prompts is None and model.adapter.backbone is bert
    backbone_names = {f"backbone.{n}" for n, _ in bert.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == backbone_names | {
        "adapter.head.weight",
        "adapter.head.bias",
    }
    assert sum(p.numel() for p in model.trainable_parameters()) == sum(p.numel() for p in bert.parameters()) + 33 * 2
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    ids, mask, segments = bert_batch
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    model.adapter.train()  # what DeepSpeed's engine.train() calls: the backbone stays without dropout
    for _ in range(2):
        opt.zero_grad()
        model.loss(ids, mask, torch.tensor([8, 0]), torch.tensor([9, 0]), segments).backward()
        opt.step()
    assert not bert.training
    changed = [k for k, v in bert.state_dict().items() if not torch.equal(before[k], v)]
    assert "encoder.layer.0.attention.self.query.weight" in changed and "embeddings.word_embeddings.weight" in changed


def test_full_fine_tuning_file_holds_the_backbone_and_round_trips(tmp_path, bert_folder, bert_batch):
    tuned = load_bert_family(bert_folder)
    model = adapt_bert_family(tuned, CONFIG.model_copy(update={"gate": "full"}), bert_folder)
    with torch.no_grad():
        tuned.encoder.layer[1].attention.self.value.weight.add_(0.1)  # as training would
    path = save_encoder_adapter(model.adapter, tmp_path / "full")
    spec = bert_family_spec(load_bert_family(bert_folder), bert_folder)
    with pytest.raises(EncoderAdapterFileError, match="full fine-tuning file"):
        load_encoder_adapter(path, spec)
    fresh = load_bert_family(bert_folder)  # the original weights, which the file's identity names
    loaded = AdaptedBertFamily(fresh, load_encoder_adapter(path, spec, backbone_module=fresh)).eval()
    with torch.no_grad():
        for a, b in zip(loaded.span_logits(*bert_batch), model.span_logits(*bert_batch)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="runs on the backbone module it holds"):
        AdaptedBertFamily(load_bert_family(bert_folder), loaded.adapter)
    with pytest.raises(ValueError, match="needs the backbone module"):
        EncoderAdapter(spec, CONFIG.model_copy(update={"gate": "full"}))


# --- the real pretrained MiniLM (all-MiniLM-L6-v2, a BertModel) ----------------------------------
@pytest.fixture(scope="module")
def minilm():
    folder = minilm_folder()
    return folder, load_bert_family(folder), load_tokenizer(folder)


def test_minilm_is_a_bert_and_zero_gates_give_it_exactly(minilm):
    folder, model, tok = minilm
    assert type(model).__name__ == "BertModel" and bert_family_spec(model).shape == {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
    }
    # 22,713,216 published (22.7M) less the pooler (384 x 384 + 384 = 147,840), which QA leaves out
    assert sum(p.numel() for p in model.parameters()) == 22_565_376
    enc = tok(
        ["Which NFL team represented the AFC at Super Bowl 50?", "Where?"],
        ["The Denver Broncos defeated the Carolina Panthers.", "In Santa Clara."],
        padding=True,
        return_tensors="pt",
    )
    assert tok.convert_ids_to_tokens(enc.input_ids[0])[:3] == ["[CLS]", "which", "nfl"]  # WordPiece, lower-cased
    batch = (enc.input_ids, enc.attention_mask, enc.token_type_ids)
    adapted = adapt_bert_family(model, EncoderAdapterConfig(prompt_len=10, layers=6), folder)
    assert adapted.adapter.spec.identity == {"name": "all-MiniLM-L6-v2", "sha256": MINILM_SHA256}
    with torch.no_grad():
        plain = model(input_ids=batch[0], attention_mask=batch[1], token_type_ids=batch[2]).last_hidden_state
        assert torch.equal(adapted.hidden(*batch), plain)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(adapted.trainable_parameters(), lr=1e-2)
    adapted.train()
    for _ in range(2):
        opt.zero_grad()
        adapted.loss(batch[0], batch[1], torch.tensor([14, 0]), torch.tensor([15, 0]), batch[2]).backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (adapted.adapter.prompts.gate != 0).any()
    with torch.no_grad():
        assert not torch.allclose(adapted.hidden(*batch), plain)
