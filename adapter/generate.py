"""`python -m adapter.generate --base DIR|FILE|NAME [--tokenizer FILE] [--adapter FILE] --prompt TEXT`

Prints the completion. `--base` takes a checkpoint folder, a GGUF file or a catalogue name
(`python -m adapter.models list`, fetched on first use); `--tokenizer` is needed only when the base
carries none. `--instruction` / `--input` apply the Alpaca template instead of a raw prompt;
`--chat` renders a user message with the base's own chat template; `--temperature 0` decodes greedily. `--image FILE [--encoder DIR]` conditions a multimodal
adapter on an image (DIR: the CLIP tower it was trained with, by default the one its training.json
names; another one is refused by name).
"""

from __future__ import annotations

import argparse
import sys

import torch

from adapter.adapter_file import AdapterFileError, import_v1_adapter, load_adapter, read_metadata
from adapter.decoding import SamplingParams, generate, prefixes_for
from adapter.image_encoder import ImageEncoder, ImageError, VisionConfig, decode_image, features_for
from adapter.loader import load_model
from adapter.models import ModelFetchError
from adapter.prompts import render_prompt, template_of
from adapter.settings import ModelSource


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--base", required=True, help="catalogue name, .gguf file, or Meta (params.json) / Hugging Face folder"
    )
    ap.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json (default: the base's own)")
    ap.add_argument("--adapter", help="adapter.safetensors (or its folder)")
    ap.add_argument("--v1-adapter", help="the authors' released v1 adapter .pth (imported, raw gates)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", help="raw prompt text; repeat for a batch")
    g.add_argument("--instruction", help="instruction, rendered with the adapter's template (else Alpaca's)")
    g.add_argument("--chat", help="a user message, rendered with the base's own chat template (no adapter)")
    ap.add_argument("--input", default="", help="optional input for --instruction")
    ap.add_argument("--image", help="image file for a multimodal adapter")
    ap.add_argument(
        "--encoder",
        help="folder of the CLIP vision tower the adapter was trained with (default: from its training.json)",
    )
    ap.add_argument("--max-gen-len", type=int, default=SamplingParams.max_gen_len)
    ap.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    ap.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "int4"],
        help="hold the base's block linears in int8 or int4 (adapter/quantize.py)",
    )
    a = ap.parse_args(argv)

    try:
        loaded = load_model(
            ModelSource(base=a.base, tokenizer=a.tokenizer, dtype=a.dtype, device=a.device, quantize=a.quantize)
        )
    except (ValueError, FileNotFoundError, ModelFetchError) as e:
        ap.error(str(e))
    base, tok, device = loaded.base, loaded.tokenizer, loaded.device
    if a.chat is not None and (a.adapter or a.v1_adapter or tok.chat_template is None):
        ap.error("--chat uses the base's own chat template: not with an adapter, and the base must carry one")
    adapter, visual = None, None
    if a.image:
        adapter, visual = _image_adapter(ap, a, base, device, loaded.dtype)
    elif a.adapter:
        adapter = load_adapter(a.adapter, base.args, device=device)
    elif a.v1_adapter:
        adapter = import_v1_adapter(a.v1_adapter, base.args).to(device)
    if a.chat is not None:
        texts = [tok.render_chat([{"role": "user", "content": a.chat}])]
    else:
        # An adapter's instruction is rendered with the template it was trained with (its file says).
        template = template_of(read_metadata(a.adapter)["extra"]) if a.adapter else "alpaca"
        texts = a.prompt if a.prompt else [render_prompt(template, a.instruction, a.input)]
    params = SamplingParams(max_gen_len=a.max_gen_len, temperature=a.temperature, top_p=a.top_p)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    if visual is not None:
        with torch.no_grad():
            prefixes = adapter.prefixes(base, visual)
    else:
        prefixes = prefixes_for(base, adapter)
    outs = generate(
        base, [tok.encode(t) for t in texts], params, tok.eos_id, adapters=[prefixes] * len(texts), generator=gen
    )
    completions = [tok.decode(o) for o in outs]
    for c in completions:
        print(c)
    sys.stdout.flush()
    return completions


def _trained_encoder(adapter: str) -> str | None:
    """The encoder folder the training job recorded beside the adapter (training.json), if any."""
    import json
    from pathlib import Path

    info = Path(adapter) / "training.json" if Path(adapter).is_dir() else Path(adapter).with_name("training.json")
    try:
        return (json.loads(info.read_text()).get("vision") or {}).get("encoder")
    except (OSError, ValueError):
        return None


def _image_adapter(ap, a, base, device, dtype):
    """The multimodal adapter and the image's token; every way it cannot work ends in a named error."""
    if not a.adapter:
        ap.error("--image needs a multimodal --adapter")
    try:
        vision = read_metadata(a.adapter)["vision"]
        if vision is None:
            ap.error(f"{a.adapter} is a text-only adapter; --image needs a multimodal one")
        encoder_dir = a.encoder or _trained_encoder(a.adapter)
        if not encoder_dir:
            ap.error(
                f"--image needs --encoder DIR (this adapter was trained with image encoder "
                f"{vision['encoder'].get('name')!r})"
            )
        encoder = ImageEncoder(
            VisionConfig(encoder=encoder_dir, feature_layers=tuple(vision["encoder"]["feature_layers"])),
            device=device,
            dtype=dtype,
        )
        adapter = load_adapter(a.adapter, base.args, device=device, encoder=encoder.identity)
        with open(a.image, "rb") as f:
            data = f.read()
        decode_image(data)
    except (AdapterFileError, ImageError, OSError, ValueError) as e:
        ap.error(f"{a.image}: {e}" if isinstance(e, ImageError) else str(e))
    feats, present = features_for(encoder, [data])
    with torch.no_grad():
        return adapter, adapter.image_tokens(feats, present)


if __name__ == "__main__":
    main()
