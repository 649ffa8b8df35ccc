"""A quantized frozen base (adapter/quantize.py, `model.quantize`): the adapter is still exactly
the base at zero gates, gradients still reach only the adapter, adapter files do not depend on
the base's precision, and the real stories260K base still writes the same story."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adapter.adapter import AdaptedLlama, AdapterConfig, AdaptionPrompts
from adapter.adapter_file import load_adapter, read_metadata, save_adapter
from adapter.decoding import SamplingParams, generate
from adapter.loader import load_model
from adapter.quantize import BLOCK_LINEARS, is_quantized, quantize_base, weight_bytes
from adapter.settings import ModelConfig, ModelSource, load_config
from tests.conftest import shared_file

MODES = ("int8", "int4")
BATCH = torch.tensor([[1, 15, 200, 33, 7, 90, 45, 3, 81, 9], [1, 300, 301, 17, 4, 99, 140, 2, 60, 70]])
LABELS = torch.where(torch.arange(BATCH.shape[1]) < 4, -100, BATCH)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stories():
    path = shared_file("stories260K")
    return ModelSource(base=str(path), tokenizer=str(path / "tokenizer.model"))


def load(source: ModelSource, quantize: str, dtype: str = "float32"):
    return load_model(source.model_copy(update={"quantize": quantize, "dtype": dtype}), device="cpu")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Packed weights are bytes viewed as floats (some read as NaN): compare them as bytes."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def trained_prompts(args, seed: int = 0) -> AdaptionPrompts:
    torch.manual_seed(seed)
    p = AdaptionPrompts(args, AdapterConfig(adapter_len=4, adapter_layers=3))
    with torch.no_grad():
        p.gate.uniform_(-0.8, 0.8)
    return p


def test_bad_quantize_value_is_a_config_error_naming_the_choices(stories):
    with pytest.raises(ValueError) as e:
        load_config(ModelConfig, None, {"tokenizer": "t.model", "preset": "tiny", "quantize": "int3"})
    assert all(c in str(e.value) for c in ("'none'", "'int8'", "'int4'")) and "quantize" in str(e.value)
    assert load_config(ModelConfig, None, ["tokenizer=t.model", "preset=tiny"]).quantize == "none"
    with pytest.raises(ValueError, match="none, int8, int4"):
        quantize_base(load(stories, "none").base, "nf3")


@pytest.mark.parametrize("mode", MODES)
def test_loader_quantizes_only_the_block_linears(stories, mode):
    base = load(stories, mode).base
    plain = load(stories, "none").base
    for layer in base.layers:
        for path in BLOCK_LINEARS:
            assert is_quantized(layer.get_submodule(path))
    assert not any(is_quantized(m) for m in (base.tok_embeddings, base.output, base.norm))
    assert torch.equal(base.output.weight, plain.output.weight)
    assert not any(p.requires_grad for p in base.parameters())
    # The working dtype is still what the base reports (the adapter casts its prompts to it).
    assert base.layers[0].attention.wk.weight.dtype == torch.float32
    linear_fp32 = sum(plain.layers[0].get_submodule(p).weight.numel() * 4 for p in BLOCK_LINEARS)
    linear_q = (
        weight_bytes(base.layers[0])
        - weight_bytes(base.layers[0].attention_norm)
        - weight_bytes(base.layers[0].ffn_norm)
    )
    assert linear_q < linear_fp32 / {"int8": 3.5, "int4": 5.5}[mode]


@pytest.mark.parametrize("mode", MODES)
def test_zero_gates_equal_the_quantized_base_exactly(stories, mode):
    base = load(stories, mode).base
    prompts = AdaptionPrompts(base.args, AdapterConfig(adapter_len=4, adapter_layers=5))
    model = AdaptedLlama(base, prompts)
    with torch.no_grad():
        assert torch.equal(model(BATCH), base(BATCH))


@pytest.mark.parametrize("mode", MODES)
def test_one_training_step_on_a_quantized_base_changes_only_the_adapter(stories, mode):
    base = load(stories, mode).base
    with torch.no_grad():  # a no-grad forward first (samples at step 0): must not break backward
        base(BATCH)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    prompts = trained_prompts(base.args)
    start = {k: v.detach().clone() for k, v in prompts.state_dict().items()}
    model = AdaptedLlama(base, prompts)
    assert model.trainable_parameters() == [prompts.prompt, prompts.gate]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss, _ = model.loss(BATCH, LABELS)
    loss.backward()
    # Every adapted layer's prompt gets a gradient: from its own wk/wv and, below the top, through
    # the quantized linears of the layers above it.
    assert all(prompts.prompt.grad[j].abs().sum() > 0 for j in range(prompts.prompt.shape[0]))
    assert prompts.gate.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
    opt.step()
    after = base.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(as_bytes(before[k]), as_bytes(after[k]))]
    assert not changed, f"frozen base tensors changed: {changed}"
    assert not torch.equal(start["prompt"], prompts.prompt) and not torch.equal(start["gate"], prompts.gate)


@pytest.mark.parametrize("mode", MODES)
def test_adapter_gradient_on_a_quantized_base_matches_the_full_precision_one(stories, mode):
    """The quantized layers' backward is right: the adapter's gradient is close to the one on the
    unquantized base (the two bases differ by quantization error only)."""
    grads = {}
    for m in ("none", mode):
        base = load(stories, m).base
        with torch.no_grad():
            base(BATCH)
        prompts = trained_prompts(base.args)
        AdaptedLlama(base, prompts).loss(BATCH, LABELS)[0].backward()
        grads[m] = torch.cat([prompts.prompt.grad.flatten(), prompts.gate.grad.flatten()])
    cos = torch.nn.functional.cosine_similarity(grads["none"], grads[mode], dim=0)
    assert cos > {"int8": 0.99, "int4": 0.9}[mode], float(cos)


def test_an_adapter_round_trips_across_base_precisions(stories, tmp_path):
    """Trained on an int8 base, saved, loaded on fp32 / bf16 / int4 bases: the same tensors and
    the same metadata as a file saved from a full-precision base."""
    q8 = load(stories, "int8").base
    prompts = trained_prompts(q8.args)
    opt = torch.optim.AdamW(prompts.parameters(), lr=1e-2)
    AdaptedLlama(q8, prompts).loss(BATCH, LABELS)[0].backward()
    opt.step()
    on_int8 = save_adapter(prompts, q8.args, tmp_path / "from-int8")
    plain = load(stories, "none").base
    on_fp32 = save_adapter(prompts, plain.args, tmp_path / "from-fp32")
    assert read_metadata(on_int8) == read_metadata(on_fp32)
    assert load_file(on_int8).keys() == load_file(on_fp32).keys()
    assert all(torch.equal(load_file(on_int8)[k], load_file(on_fp32)[k]) for k in load_file(on_int8))
    outputs = {}
    for mode, dtype in (("none", "float32"), ("none", "bfloat16"), ("int4", "float32"), ("int8", "float32")):
        base = load(stories, mode, dtype).base
        loaded = load_adapter(on_int8, base.args)
        assert torch.equal(loaded.prompt, prompts.prompt) and torch.equal(loaded.gate, prompts.gate)
        with torch.no_grad():  # what the adapter adds to the logits of this base
            outputs[mode, dtype] = (AdaptedLlama(base, loaded)(BATCH) - base(BATCH)).flatten()
    ref = outputs["none", "float32"]
    for key, shift in outputs.items():  # the adapter acts the same on every base (to quantization error)
        cos = torch.nn.functional.cosine_similarity(shift, ref, dim=0)
        assert cos > 0.9, (key, float(cos))


def test_int8_stories260k_writes_the_same_story_greedily(stories):
    """The real pretrained base: greedy continuations under int8 agree with fp32 token for token
    at the start and read as English."""
    params = SamplingParams(max_gen_len=32, temperature=0)
    outs = {}
    for mode in ("none", "int8"):
        lm = load(stories, mode)
        prompts = [lm.tokenizer.encode(t) for t in ("Once upon a time", "The little dog")]
        outs[mode] = generate(lm.base, prompts, params, lm.tokenizer.eos_id)
    for ref, q in zip(outs["none"], outs["int8"]):
        assert q[:16] == ref[:16]
    text = lm.tokenizer.decode(outs["int8"][0])
    assert sum(c.isalpha() or c in " .,'" for c in text) / len(text) > 0.95 and " the " in f" {text} ".lower(), text


def test_generate_cli_takes_quantize(stories, capsys):
    from adapter.generate import main

    out = main(
        [
            "--base",
            stories.base,
            "--tokenizer",
            stories.tokenizer,
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0",
            "--max-gen-len",
            "8",
            "--quantize",
            "int4",
        ]
    )
    assert len(out) == 1 and out[0].strip()
    with pytest.raises(SystemExit):
        main(["--base", stories.base, "--tokenizer", stories.tokenizer, "--prompt", "x", "--quantize", "int2"])
