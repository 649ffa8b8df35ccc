"""Zero-init attention on bidirectional encoders: ViT image classification, BERT-family (BERT,
RoBERTa) extractive QA.

The ICLR version of LLaMA-Adapter (docs/encoders.md) puts the same adaption prompts and
zero-gated attention (section 3, adapter/zero_init.py) into the top L attention layers of other
frozen models. Per adapted layer, with x the layer's attention input:

    context = softmax(q k_T^T) v_T  +  gate_h * softmax(q k_P^T) v_P,     then the output projection

where q comes from x, and the prompt's keys/values from P_l, all through the layer's own frozen
projections (with their biases). No mask on the prompt: every token, padding included, sees it.

How it is attached: the backbone stays exactly the module it was loaded as (same state-dict
keys, no patched classes). During one forward, a hook on each adapted attention module adds the
gated term to that module's output. The term enters before the output projection: BERT's and
RoBERTa's self-attention modules return the context before `*SelfOutput.dense`, so the term is added
as is; torchvision's MultiheadAttention returns `out_proj(context)`, and since out_proj is linear,
out_proj(context + term) = out_proj(context) + term W_o^T, so `term W_o^T` (no bias) is added.
With gates at 0 the term is exactly zero and outputs equal the plain backbone's bit for bit.

Trainable: one `EncoderAdapter` module (prompts, gates, task head), which is all an optimizer or
DeepSpeed needs to see. The backbone is frozen and kept in eval mode (no dropout), also while
the adapter trains. Gate variants (`EncoderAdapterConfig.gate`): "zero-init" (the method),
"fixed-one" (prompts attended with weight 1 from the start and the gate not trained: attention
to random prompts at full weight from step 0, the contrast to zero-init gating), "linear-probe" (no
prompts, the head alone), "full" (no prompts; the head and every backbone weight train: full
fine-tuning, the reference the paper compares against). In "full" the adapter holds the backbone
module itself, so optimizers, DeepSpeed and adapter files see its weights like any other adapter
tensor; the backbone still runs in eval mode (no dropout), as in every other arm, so the arms differ
only in what trains.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from adapter.adapter_file import FORMAT as LLAMA_ADAPTER_FORMAT
from adapter.adapter_file import AdapterFileError, write_atomically
from adapter.backbones.bert_family import WEIGHTS_FILE, bert_family_shape
from adapter.hashing import sha256_of
from adapter.settings import Section
from adapter.zero_init import GatedPrompts, PromptKV, gated_prompt_attention

FORMAT = "zero-init-encoder-adapter"
FORMAT_VERSION = "1"
ADAPTER_FILENAME = "encoder_adapter.safetensors"
CLASSIFICATION, QA = "image-classification", "extractive-qa"
TASK_OF_KIND = {"vit": CLASSIFICATION, "bert": QA, "roberta": QA}  # bert / roberta: config.json model_type
HEAD_INIT_STD = 0.02  # not 0 (torchvision's head init): a zero head passes no gradient to the gates at step 1


class EncoderAdapterConfig(Section):
    """Where the prompts go and how their attention is gated."""

    prompt_len: int = Field(10, ge=1, description="K: prompt tokens per adapted layer")
    layers: int = Field(6, ge=1, description="L: adapt the topmost L attention layers (clamped to the depth)")
    gate: Literal["zero-init", "fixed-one", "linear-probe", "full"] = Field(
        "zero-init",
        description="zero-init: tanh gate from 0, trained (the method); fixed-one: gate 1, not trained "
        "(ablation); linear-probe: no prompts, head only; full: no prompts, the head and the whole "
        "backbone train (full fine-tuning, the reference)",
    )
    # The prompt enters the key/value projections where the layer normally sees LayerNorm outputs
    # (ViT's ln_1, BERT's / RoBERTa's previous LayerNorm): unit scale per element. N(0, 1), as the authors'
    # nn.Embedding prompts, puts it on that scale; 0.02 (the backbones' weight init) would give
    # prompt keys/values that are little more than the projection biases, all alike.
    init_std: float = Field(1.0, gt=0, description="prompts start N(0, init_std^2)")

    def layers_for(self, depth: int) -> int:
        return 0 if self.gate in ("linear-probe", "full") else min(self.layers, depth)


@dataclass(frozen=True)
class BackboneSpec:
    """What an adapter is trained on: kind ("vit", or the BERT family's model_type "bert" / "roberta"),
    shape, and identity of the weights
    ({"name", "sha256"}, or None where the weights file is not known)."""

    kind: str
    shape: dict
    identity: dict | None = None

    def __post_init__(self):
        if self.kind not in TASK_OF_KIND:
            raise ValueError(f"backbone kind must be one of {sorted(TASK_OF_KIND)}, got {self.kind!r}")

    @property
    def depth(self) -> int:
        return self.shape["num_layers" if self.kind == "vit" else "num_hidden_layers"]

    @property
    def width(self) -> int:
        return self.shape["hidden_dim" if self.kind == "vit" else "hidden_size"]

    @property
    def heads(self) -> int:
        return self.shape["num_heads" if self.kind == "vit" else "num_attention_heads"]


def file_identity(path: str | Path) -> dict:
    """sha256 of a weights file and its name for messages."""
    path = Path(path)
    return {"name": path.name if path.name != "model.safetensors" else path.parent.name, "sha256": sha256_of(path)}


def vit_spec(vit, weights: str | Path | None = None) -> BackboneSpec:
    """weights: the file `load_vit` read, to record its identity. The ViT's own head is left out of
    the shape: the adapter replaces it."""
    shape = vit.shape.model_dump(exclude={"num_classes"})
    return BackboneSpec("vit", shape, None if weights is None else file_identity(weights))


def bert_family_spec(model, folder: str | Path | None = None) -> BackboneSpec:
    """A BertModel / RobertaModel: its kind is the config's model_type; `folder` (where it was read)
    gives its identity."""
    identity = None if folder is None else file_identity(Path(folder) / WEIGHTS_FILE)
    return BackboneSpec(model.config.model_type, bert_family_shape(model), identity)


class EncoderAdapter(nn.Module):
    """The trainable part: prompts (L, K, width) and gates (L, heads) for the top L layers (none for
    a linear probe or full fine-tuning), and the task head (width -> classes, or width -> start/end
    logits). Full fine-tuning (gate "full") also holds the backbone module, which then trains."""

    def __init__(
        self,
        spec: BackboneSpec,
        config: EncoderAdapterConfig = EncoderAdapterConfig(),
        labels: list[str] | None = None,
        device=None,
        backbone: nn.Module | None = None,
    ):
        """backbone: the loaded backbone module, needed (and only taken) for gate "full"."""
        super().__init__()
        self.spec, self.config = spec, config
        if config.gate == "full":
            if backbone is None:
                raise ValueError('gate "full" (full fine-tuning) needs the backbone module whose weights train')
            self.backbone = backbone.requires_grad_(True)
        else:
            self.backbone = None
        self.task = TASK_OF_KIND[spec.kind]
        if self.task == CLASSIFICATION and not labels:
            raise ValueError("image classification needs its class labels (names, in class-index order)")
        self.labels = list(labels) if self.task == CLASSIFICATION else None
        n_adapted = config.layers_for(spec.depth)
        self.first_layer = spec.depth - n_adapted
        self.prompts = None
        if n_adapted:
            self.prompts = GatedPrompts(
                n_adapted,
                config.prompt_len,
                spec.width,
                spec.heads,
                config.init_std,
                "tanh" if config.gate == "zero-init" else "identity",
                device=device,
            )
        # HF's qa_outputs convention: Linear(hidden, 2) -> start, end logits per token
        self.head = nn.Linear(spec.width, len(self.labels) if self.labels else 2, device=device)
        if self.head.weight.device.type != "meta":
            nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(self.head.bias)
        self._fix_gate()

    def _fix_gate(self) -> None:
        """fixed-one: the gate is 1 and stays 1 (never handed to an optimizer)."""
        if self.config.gate == "fixed-one":
            if self.prompts.gate.device.type != "meta":
                with torch.no_grad():
                    self.prompts.gate.fill_(1.0)
            self.prompts.gate.requires_grad_(False)

    def train(self, mode: bool = True) -> EncoderAdapter:
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # full fine-tuning without dropout, like the frozen arms: only what trains differs
        return self

    @property
    def adapted_layers(self) -> range:
        return range(self.first_layer, self.spec.depth)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


# --- the adapted backbones ----------------------------------------------------------------------
class AdaptedEncoder(nn.Module):
    """A frozen encoder plus an EncoderAdapter; subclasses say where its attention layers are and
    how they project (`attention_layers`, `_project`, `_to_output`)."""

    INPUT_NAME: str  # the attention module's input argument, for when it is passed by keyword

    def __init__(self, backbone: nn.Module, adapter: EncoderAdapter, spec: BackboneSpec):
        """spec: the backbone's kind and shape, to check the adapter against (identity is checked on load)."""
        super().__init__()
        if adapter.spec.kind != spec.kind or adapter.spec.shape != spec.shape:
            raise ValueError(
                f"adapter was built for a {adapter.spec.kind} of shape {adapter.spec.shape}, "
                f"not this {spec.kind} of shape {spec.shape}"
            )
        if adapter.backbone is not None and adapter.backbone is not backbone:
            raise ValueError("a full fine-tuning adapter runs on the backbone module it holds, not another one")
        self.backbone = backbone.eval().requires_grad_(adapter.backbone is not None)  # frozen unless "full"
        self.adapter = adapter

    def train(self, mode: bool = True) -> AdaptedEncoder:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: no dropout in the backbone, also while training
        return self

    def attention_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def _project(self, attn: nn.Module, x: torch.Tensor, which: str) -> torch.Tensor:
        """(..., width) through the layer's frozen q, k or v projection, with its bias."""
        raise NotImplementedError

    def _to_output(self, attn: nn.Module, context: torch.Tensor) -> torch.Tensor:
        """What lies between the attention context and the module's output (linear, no bias)."""
        return context

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.adapter.trainable_parameters()

    @contextmanager
    def _prompts_attached(self):
        """Hooks adding the gated prompt term to each adapted layer, for the duration of one forward."""
        prompts = self.adapter.prompts
        if prompts is None:  # linear probe
            yield
            return
        gates = prompts.activated_gate()
        layers = self.attention_layers()
        handles = [
            layers[i].register_forward_hook(partial(self._add_prompt_term, j=j, gate=gates[j]), with_kwargs=True)
            for j, i in enumerate(self.adapter.adapted_layers)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _add_prompt_term(
        self, attn: nn.Module, args: tuple, kwargs: dict, output: tuple, j: int, gate: torch.Tensor
    ) -> tuple:
        x = args[0] if args else kwargs[self.INPUT_NAME]
        (b, t, width), n_heads = x.shape, self.adapter.spec.heads

        def heads(y: torch.Tensor) -> torch.Tensor:  # (B, T, width) -> (B, heads, T, head_dim)
            return y.view(y.shape[0], y.shape[1], n_heads, width // n_heads).transpose(1, 2)

        prompt = self.adapter.prompts.prompt[j][None].to(x.dtype)
        prefix = PromptKV(
            k=heads(self._project(attn, prompt, "k")), v=heads(self._project(attn, prompt, "v")), gate=gate[None]
        )
        term = gated_prompt_attention(heads(self._project(attn, x, "q")), prefix)
        term = self._to_output(attn, term.transpose(1, 2).reshape(b, t, width))
        return (output[0] + term.to(output[0].dtype), *output[1:])


class AdaptedViT(AdaptedEncoder):
    """Image classification: a new head on the final CLS feature (torchvision's `heads.head` unused)."""

    kind, INPUT_NAME = "vit", "query"

    def __init__(self, vit, adapter: EncoderAdapter):
        super().__init__(vit, adapter, vit_spec(vit))

    def attention_layers(self) -> list[nn.Module]:
        return [block.self_attention for block in self.backbone.blocks]

    def _project(self, attn: nn.MultiheadAttention, x: torch.Tensor, which: str) -> torch.Tensor:
        rows = slice("qkv".index(which) * attn.embed_dim, ("qkv".index(which) + 1) * attn.embed_dim)
        return F.linear(x, attn.in_proj_weight[rows], attn.in_proj_bias[rows])

    def _to_output(self, attn: nn.MultiheadAttention, context: torch.Tensor) -> torch.Tensor:
        return F.linear(context, attn.out_proj.weight)  # out_proj(a + b) = out_proj(a) + b W_o^T

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self._prompts_attached():
            return self.backbone.features(pixel_values)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, classes) fp32."""
        return self.adapter.head(self.features(pixel_values).to(self.adapter.head.weight.dtype))

    forward = logits

    def loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(pixel_values), labels)


class AdaptedBertFamily(AdaptedEncoder):
    """Extractive QA on a BertModel / RobertaModel: start/end logits for every token; position 0
    (CLS / <s>) means "no answer" (SQuAD v2.0)."""

    INPUT_NAME = "hidden_states"

    def __init__(self, model, adapter: EncoderAdapter):
        super().__init__(model, adapter, bert_family_spec(model))

    @property
    def kind(self) -> str:
        return self.adapter.spec.kind

    def attention_layers(self) -> list[nn.Module]:
        return [layer.attention.self for layer in self.backbone.encoder.layer]

    def _project(self, attn: nn.Module, x: torch.Tensor, which: str) -> torch.Tensor:
        return {"q": attn.query, "k": attn.key, "v": attn.value}[which](x)

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, hidden): the last hidden state. token_type_ids: BERT's segments (question 0,
        context 1); None is all 0 (RoBERTa's only segment)."""
        with self._prompts_attached():
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state

    def span_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) logits, each (B, T) fp32."""
        h = self.hidden(input_ids, attention_mask, token_type_ids).to(self.adapter.head.weight.dtype)
        start, end = self.adapter.head(h).unbind(-1)
        return start, end

    forward = span_logits

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        start_positions: torch.Tensor,
        end_positions: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean of the start and end cross-entropies (BertForQuestionAnswering's loss): positions
        outside the input (an answer truncated away) are left out of the mean."""
        start, end = self.span_logits(input_ids, attention_mask, token_type_ids)
        outside = start.shape[1]
        losses = [
            F.cross_entropy(logits, pos.clamp(0, outside), ignore_index=outside)
            for logits, pos in ((start, start_positions), (end, end_positions))
        ]
        return (losses[0] + losses[1]) / 2


def adapt_vit(vit, config: EncoderAdapterConfig, labels: list[str], weights: str | Path | None = None) -> AdaptedViT:
    """A fresh adapter on a loaded ViT; `weights` (its file) gives the adapter file a backbone identity."""
    return AdaptedViT(vit, EncoderAdapter(vit_spec(vit, weights), config, labels, backbone=vit))


def adapt_bert_family(model, config: EncoderAdapterConfig, folder: str | Path | None = None) -> AdaptedBertFamily:
    """A fresh adapter on a loaded BertModel / RobertaModel; `folder` (where it was read) gives its identity."""
    return AdaptedBertFamily(model, EncoderAdapter(bert_family_spec(model, folder), config, backbone=model))


# --- adapter files ------------------------------------------------------------------------------
class EncoderAdapterFileError(AdapterFileError):
    """Not an encoder adapter for this backbone (or not readable at all); the message says why."""


def save_encoder_adapter(adapter: EncoderAdapter, path: str | Path, extra: dict | None = None) -> Path:
    """safetensors with the backbone, task, labels and config in the header; written atomically."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / ADAPTER_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": json.dumps(asdict(adapter.spec)),
        "task": adapter.task,
        "labels": json.dumps(adapter.labels),
        "adapter_config": adapter.config.model_dump_json(),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: t.detach().cpu().contiguous() for k, t in adapter.state_dict().items()}
    return write_atomically(tensors, meta, path)


def read_encoder_metadata(path: str | Path) -> dict:
    """backbone (a BackboneSpec), task, labels, config and extra of an encoder adapter file."""
    path = _resolve(path)
    with _open(path) as f:
        meta = f.metadata() or {}
    if meta.get("format") == LLAMA_ADAPTER_FORMAT:
        raise EncoderAdapterFileError(f"{path}: a LLaMA adapter file, not an encoder (ViT / BERT-family) adapter")
    if meta.get("format") != FORMAT:
        raise EncoderAdapterFileError(f"{path}: not an encoder adapter file (format={meta.get('format')!r})")
    try:
        return {
            "backbone": BackboneSpec(**json.loads(meta["backbone"])),
            "task": meta["task"],
            "labels": json.loads(meta["labels"]),
            "config": EncoderAdapterConfig.model_validate_json(meta["adapter_config"]),
            "extra": json.loads(meta.get("extra", "{}")),
        }
    except KeyError as e:
        raise EncoderAdapterFileError(f"{path}: encoder adapter metadata lacks {e}") from None
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid settings
        raise EncoderAdapterFileError(f"{path}: bad encoder adapter metadata ({e})") from None


def load_encoder_adapter(
    path: str | Path,
    backbone: BackboneSpec,
    device: str | torch.device = "cpu",
    backbone_module: nn.Module | None = None,
) -> EncoderAdapter:
    """The adapter in `path`, checked against the backbone it will run on: kind, shape and (where both
    are known) the weights' sha256 must match. Hand it with the backbone to AdaptedViT / AdaptedBertFamily.
    A full fine-tuning file (gate "full") also holds every backbone weight: they are loaded into
    `backbone_module` (the backbone loaded from the original weights, which the file was checked against)."""
    from safetensors import SafetensorError

    path = _resolve(path)
    meta = read_encoder_metadata(path)
    saved: BackboneSpec = meta["backbone"]
    if saved.kind != backbone.kind:
        raise EncoderAdapterFileError(f"{path}: an adapter for a {saved.kind} backbone, not a {backbone.kind}")
    diffs = [
        f"{k}: adapter {saved.shape.get(k)} vs backbone {v}"
        for k, v in backbone.shape.items()
        if saved.shape.get(k) != v
    ] + [f"{k}: only in the adapter's backbone" for k in saved.shape if k not in backbone.shape]
    if diffs:
        raise EncoderAdapterFileError(
            f"{path}: adapter was trained on a differently shaped {saved.kind} ({'; '.join(diffs)})"
        )
    if saved.identity and backbone.identity and saved.identity.get("sha256") != backbone.identity.get("sha256"):
        raise EncoderAdapterFileError(
            f"{path}: trained on {saved.kind} weights {saved.identity.get('name')!r} (sha256 "
            f"{str(saved.identity.get('sha256'))[:12]}), not {backbone.identity.get('name')!r} "
            f"(sha256 {str(backbone.identity.get('sha256'))[:12]})"
        )
    if meta["task"] != TASK_OF_KIND[saved.kind]:
        raise EncoderAdapterFileError(f"{path}: task {meta['task']!r} is not {TASK_OF_KIND[saved.kind]!r}")
    if meta["config"].gate == "full" and backbone_module is None:
        raise EncoderAdapterFileError(
            f"{path}: a full fine-tuning file: pass the loaded backbone module to load its weights into"
        )
    try:
        adapter = EncoderAdapter(
            BackboneSpec(saved.kind, saved.shape, backbone.identity or saved.identity),
            meta["config"],
            meta["labels"],
            device="meta",
            backbone=backbone_module,
        )
    except (ValueError, TypeError, KeyError) as e:
        raise EncoderAdapterFileError(f"{path}: bad encoder adapter metadata ({e!r})") from None
    try:
        with _open(path) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise EncoderAdapterFileError(f"{path}: corrupt adapter file ({e})") from None
    expected = adapter.state_dict()
    if set(tensors) != set(expected):
        raise EncoderAdapterFileError(
            f"{path}: tensors {sorted(tensors)} do not match {meta['config']} (expected {sorted(expected)})"
        )
    for name, t in expected.items():
        if tensors[name].shape != t.shape:
            raise EncoderAdapterFileError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(t.shape)}"
            )
        if not torch.isfinite(tensors[name]).all():
            raise EncoderAdapterFileError(f"{path}: tensor {name!r} holds NaN or infinite values")
    # copy=True: tensors in torch's own (aligned) memory, so outputs match the saved adapter's bit for bit
    adapter.load_state_dict(
        {k: v.to(device=device, dtype=torch.float32, copy=True) for k, v in tensors.items()}, assign=True
    )
    adapter.requires_grad_(True)
    adapter._fix_gate()
    return adapter


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILENAME
    if not path.is_file():
        raise EncoderAdapterFileError(f"encoder adapter file not found: {path}")
    return path


def _open(path: Path):
    """safetensors' own reader checks the header and that the data covers it (a truncated file
    fails here); a pickle is named as one, never unpickled."""
    from safetensors import SafetensorError, safe_open

    try:  # first: a valid header of 128 + 256k bytes also starts with pickle's 0x80
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as e:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"PK" or magic[:1] == b"\x80":
            raise EncoderAdapterFileError(
                f"{path}: a pickle / torch.save file, refused (adapters are safetensors only)"
            ) from None
        raise EncoderAdapterFileError(f"{path}: corrupt or truncated safetensors file ({e})") from None
