"""`python -m adapter.params --preset llama-7b`: trainable and total parameter counts as JSON.

Counted on meta tensors, so even the 70B shape costs no memory.
"""

from __future__ import annotations

import argparse
import json

from adapter.adapter import AdapterConfig, parameter_counts
from adapter.model_args import PRESETS, preset


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--adapter-len", type=int, default=AdapterConfig.adapter_len)
    ap.add_argument("--adapter-layers", type=int, default=AdapterConfig.adapter_layers)
    a = ap.parse_args(argv)
    counts = parameter_counts(preset(a.preset), AdapterConfig(a.adapter_len, a.adapter_layers))
    counts = {"preset": a.preset, **counts}
    print(json.dumps(counts, indent=2))
    return counts


if __name__ == "__main__":
    main()
