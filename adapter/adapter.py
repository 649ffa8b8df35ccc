"""LLaMA-Adapter: adaption prompts on the top L layers with zero-init, per-head gates.

The method for LLaMA (docs/method.md): a (L, K, dim) prompt table and an (L, n_heads)
gate table (adapter/zero_init.py, shared with the ViT and RoBERTa adapters). For each adapted
layer the prompt goes through that layer's frozen wk / wv (no rotary) and the model attends to it with a separate softmax, scaled by tanh(gate). Gates
start at 0, so an untrained adapter leaves the base model's outputs exactly unchanged.
Multimodal (section 7): an optional projection turns image features into one token that is added
to every adapted layer's prompt (the encoder and projection live in adapter/image_encoder.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adapter.model import Transformer, build_on_meta
from adapter.model_args import ModelArgs
from adapter.zero_init import GATE_ACTIVATIONS, GatedPrompts, PromptKV

GATE_INITS = ("zero", "random", "fixed-one")
IGNORE_INDEX = -100  # label for positions outside the loss (not 0: that is a real token, <unk>)


@dataclass(frozen=True)
class AdapterConfig:
    adapter_len: int = 10  # K: prompt tokens per adapted layer
    adapter_layers: int = 30  # L: adapt the topmost L layers (clamped to the model's depth)
    # "tanh" for our adapters; "identity" reproduces the authors' released v1 inference code,
    # which multiplies by the raw gate.
    gate_activation: str = "tanh"
    # Prompts start N(0, init_std^2). The authors' prompts are an nn.Embedding, whose default
    # initialisation is N(0, 1); their learning rate was tuned for that scale.
    init_std: float = 1.0
    # The paper's ablation (docs/method.md, "Why zero-init"): "zero" is the method; "random" starts the
    # gates N(0, 1) and trains them; "fixed-one" removes the gating (weight 1, not trained).
    gate_init: str = "zero"

    def __post_init__(self) -> None:
        if self.adapter_len < 1 or self.adapter_layers < 1:
            raise ValueError(f"adapter_len and adapter_layers must be >= 1, got {self}")
        if not 0 < self.init_std < float("inf"):
            raise ValueError(f"init_std must be a positive number, got {self.init_std}")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {self.gate_activation!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")

    def layers_for(self, args: ModelArgs) -> int:
        return min(self.adapter_layers, args.n_layers)

    def to_dict(self) -> dict:
        return asdict(self)


class AdaptionPrompts(GatedPrompts):
    """The trainable part for one LLaMA shape: prompts (L, K, dim) and gates (L, n_heads)."""

    def __init__(
        self,
        args: ModelArgs,
        config: AdapterConfig = AdapterConfig(),
        dtype: torch.dtype = torch.float32,
        device=None,
        projection: nn.Module | None = None,
    ):
        n_adapted = config.layers_for(args)
        super().__init__(
            n_adapted,
            config.adapter_len,
            args.dim,
            args.n_heads,
            config.init_std,
            # Without gating the prompt term is weighted by the raw gate, held at 1.
            "identity" if config.gate_init == "fixed-one" else config.gate_activation,
            dtype,
            device,
        )
        if self.gate.device.type != "meta" and config.gate_init != "zero":
            with torch.no_grad():
                if config.gate_init == "random":
                    nn.init.normal_(self.gate, std=1.0)
                else:
                    self.gate.fill_(1.0)
        if config.gate_init == "fixed-one":
            self.gate.requires_grad_(False)  # never handed to an optimizer
        self.config = config
        self.n_layers = args.n_layers
        self.first_layer = args.n_layers - n_adapted
        # Multimodal only: image features -> one (dim,) token per image (adapter/image_encoder.py).
        self.projection = projection

    @property
    def adapted_layers(self) -> range:
        return range(self.first_layer, self.n_layers)

    def image_tokens(self, features: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """(B, F) image features -> (B, dim) image tokens; rows where `present` is False get 0 (no image)."""
        if self.projection is None:
            raise ValueError("this is a text-only adapter: it has no visual projection and cannot take an image")
        tokens = self.projection(features.to(self.prompt.dtype))
        return tokens if present is None else tokens * present[:, None].to(tokens.dtype)

    def prefixes(self, base: Transformer, image_tokens: torch.Tensor | None = None) -> dict[int, PromptKV]:
        """Per adapted layer, the prompt's keys/values through that layer's frozen wk/wv.

        image_tokens: (B, dim) from `image_tokens`, added to every layer's prompt (P_l + repeat(I_p),
        docs/multimodal.md); the keys/values then have one row per image.
        At generation time call this once per request: the result does not depend on the tokens.
        """
        gates = self.activated_gate()
        out = {}
        for j, i in enumerate(self.adapted_layers):
            attn = base.layers[i].attention
            prompt = self.prompt[j][None] if image_tokens is None else self.prompt[j][None] + image_tokens[:, None]
            k, v = attn.project_kv(prompt.to(attn.wk.weight.dtype))
            out[i] = PromptKV(k=k, v=v, gate=gates[j][None])
        return out


class AdaptedLlama(nn.Module):
    """A frozen base model plus one set of adaption prompts; only the prompts and gates train."""

    def __init__(self, base: Transformer, prompts: AdaptionPrompts):
        super().__init__()
        if prompts.n_layers != base.args.n_layers or prompts.prompt.shape[-1] != base.args.dim:
            raise ValueError("adaption prompts were built for a different base shape")
        self.base = base
        self.adapter = prompts
        base.requires_grad_(False)

    def hidden(
        self,
        tokens: torch.Tensor,
        image_features: torch.Tensor | None = None,
        image_present: torch.Tensor | None = None,
        **kw,
    ) -> torch.Tensor:
        """image_features: (B, F) from the frozen encoder (multimodal adapters); image_present: (B,) bool."""
        visual = None if image_features is None else self.adapter.image_tokens(image_features, image_present)
        return self.base.hidden(
            tokens, prefixes=self.adapter.prefixes(self.base, visual), no_grad_below=self.adapter.first_layer, **kw
        )

    def forward(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        return self.base.output(self.hidden(tokens, **kw)).float()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, **images) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean next-token cross-entropy over labelled positions, and how many there were (a
        0-d tensor: reading it would stall a GPU step, so callers sum it and read it rarely).
        `images`: image_features / image_present for a multimodal adapter (see `hidden`).

        Logits are computed only where the label counts (about half of the real tokens of an
        Alpaca batch and none of its padding): the output projection is a large share of the cost.
        """
        h = self.hidden(input_ids, **images)[:, :-1]
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = self.base.output(h[keep]).float()
        n = keep.sum()
        total = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
        return total / n.clamp(min=1), n

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def parameter_counts(args: ModelArgs, config: AdapterConfig = AdapterConfig()) -> dict:
    """Trainable and total parameters, from shapes alone (meta tensors: nothing is allocated)."""
    base = build_on_meta(args)
    prompts = AdaptionPrompts(args, config, device="meta")
    frozen = sum(p.numel() for p in base.parameters())
    trainable = sum(p.numel() for p in prompts.parameters())
    n_adapted = config.layers_for(args)
    return {
        "trainable": trainable,
        "prompt_values": prompts.prompt.numel(),
        "gate_values": prompts.gate.numel(),
        "frozen": frozen,
        "total": frozen + trainable,
        "trainable_fraction": trainable / (frozen + trainable),
        "adapter_len": config.adapter_len,
        "adapter_layers": n_adapted,
        "adapter_fp32_bytes": trainable * 4,
    }


def batch_prefixes(rows: list[dict[int, PromptKV] | None]) -> dict[int, PromptKV]:
    """Stack per-request prefixes into one batch, so requests for different adapters (or none)
    share a forward pass. A row without a prompt at some layer gets zero keys/values and gate 0,
    which adds exactly nothing: that row computes what the base model computes."""
    present = [r for r in rows if r]
    if not present:
        return {}
    layers = sorted({i for r in present for i in r})
    out = {}
    for i in layers:
        ref = next(r[i] for r in present if i in r)
        ks, vs, gs = [], [], []
        for r in rows:
            p = r.get(i) if r else None
            if p is None or p.k.shape[2] != ref.k.shape[2]:
                if p is not None:
                    raise ValueError("adapters with different prompt lengths cannot share a batch")
                ks.append(torch.zeros_like(ref.k))
                vs.append(torch.zeros_like(ref.v))
                gs.append(torch.zeros_like(ref.gate))
            else:
                ks.append(p.k)
                vs.append(p.v)
                gs.append(p.gate)
        out[i] = PromptKV(k=torch.cat(ks), v=torch.cat(vs), gate=torch.cat(gs))
    return out
