"""Check `adapter/backbones/vit.py` against the real torchvision, once: the evidence behind its claim to be
torchvision's `VisionTransformer` / vit_b_16 written again (same state-dict keys, same outputs,
same ViT_B_16_Weights.IMAGENET1K_V1 preprocessing).

Why a separate script and venv: torchvision cannot be installed beside this project's torch build,
so the check runs in a throwaway venv that has the real torchvision, imports `adapter.backbones.vit` from
the repo through PYTHONPATH, and writes bench/results/torchvision_check.json. Nothing here is
imported by the project or its tests.

    python3 -m venv /tmp/tv-venv
    /tmp/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 safetensors pillow numpy pydantic pyyaml
    PYTHONPATH=/work/main /tmp/tv-venv/bin/python bench/torchvision_check.py [--repo-python PATH]

What it compares (eval mode, fp32, CPU):
  (a) torchvision `VisionTransformer` at small shapes and at the real `vit_b_16()` shape (random
      init, weights=None; the zero-initialised head and class token are randomised so logits are
      not all equal), saved with torch.save (.pth; one small one as .safetensors), loaded with
      `adapter.backbones.vit.load_vit`: max abs diff of logits, and of `features` vs torchvision's CLS token
      after encoder.ln (a forward hook);
  (b) the state-dict key lists (order included) and tensor shapes;
  (c) a legacy checkpoint (mlp.0/mlp.3 renamed mlp.linear_1/mlp.linear_2, as torchvision files
      from before pytorch/vision#6053 have): torchvision itself and `load_vit` both load it;
  (d) `adapter.backbones.vit.preprocess_images` vs ViT_B_16_Weights.IMAGENET1K_V1.transforms() on PIL
      images of odd sizes (and the same ratio at a toy 32px size);
  (e) cross-environment: the same checkpoints loaded by `load_vit` under the project's own venv
      (--repo-python, default /work/main/.venv/bin/python; skipped if absent), compared with
      torchvision's logits; a different torch build, so a looser tolerance;
  and a negative control (a nudged weight must fail the logits check), plus, for information, the
  same transform fed a uint8 tensor instead of a PIL image (torchvision's own resize kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "torchvision_check.json"
TOL_SAME_ENV = 1e-5  # same torch build, same kernels: expected exact or float rounding
TOL_CROSS_ENV = 1e-4  # project's torch build vs torchvision's
TOL_PREPROCESS = 1e-6  # both resize with PIL and normalise the same way: expected exact
SMALL_SHAPES = [
    dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
    dict(image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=48, mlp_dim=96, num_classes=10),
    dict(image_size=48, patch_size=16, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=96, num_classes=7),
]
IMAGE_SIZES = [(300, 200), (640, 480), (224, 224), (1000, 333), (333, 1000), (257, 255)]


def versions() -> dict:
    import numpy
    import PIL
    import pydantic

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "pydantic": pydantic.__version__,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except ImportError:
        info["safetensors"] = None
    return info


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --- the project's side: run under either venv ----------------------------------------------------
def adapter_outputs(work: Path) -> dict:
    """`load_vit` on every checkpoint listed in work/cases.json, on the saved inputs."""
    from adapter.backbones.vit import ViTShape, load_vit

    out = {}
    for case in json.loads((work / "cases.json").read_text()):
        model = load_vit(work / case["file"], ViTShape(**case["shape"]))
        x = torch.load(work / case["input"], weights_only=True)
        with torch.no_grad():
            out[case["name"]] = {"logits": model(x), "features": model.features(x)}
    return out


def worker(work: Path) -> None:
    torch.set_num_threads(2)
    torch.save(adapter_outputs(work), work / "repo_env_outputs.pt")
    (work / "repo_env_versions.json").write_text(json.dumps(versions()))


# --- torchvision's side ---------------------------------------------------------------------------
def torchvision_model(shape: dict, seed: int):
    from torchvision.models import vit_b_16
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    if shape == dict(
        image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=1000
    ):
        model = vit_b_16(weights=None)  # the real builder, no download
    else:
        model = VisionTransformer(**shape)
    with torch.no_grad():  # torchvision starts these at zero: randomise so the comparison means something
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        torch.nn.init.normal_(model.heads.head.bias, std=0.02)
        torch.nn.init.normal_(model.class_token, std=0.02)
    return model.eval()


def torchvision_run(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and the CLS token after encoder.ln (what adapter's `features` returns)."""
    seen = {}
    hook = model.encoder.ln.register_forward_hook(lambda m, i, o: seen.__setitem__("ln", o))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return logits, seen["ln"][:, 0]


def check_models(work: Path) -> tuple[list, list, dict]:
    from safetensors.torch import save_file

    from adapter.backbones.vit import VisionTransformer as AdapterViT
    from adapter.backbones.vit import ViTShape

    vit_b = ViTShape.vit_b_16().model_dump()
    specs = [(f"small{i}", s, ".pth") for i, s in enumerate(SMALL_SHAPES)]
    specs += [("small0-safetensors", SMALL_SHAPES[0], ".safetensors"), ("vit_b_16", vit_b, ".pth")]
    cases, results, reference = [], [], {}
    for seed, (name, shape, ext) in enumerate(specs):
        model = torchvision_model(shape, seed)
        state = model.state_dict()
        file = f"{name}{ext}"
        if ext == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(work / file))
        else:
            torch.save(state, work / file)
        torch.manual_seed(1000 + seed)
        x = torch.randn(2, 3, shape["image_size"], shape["image_size"])
        torch.save(x, work / f"{name}.input.pt")
        logits, cls = torchvision_run(model, x)
        reference[name] = logits
        cases.append({"name": name, "shape": shape, "file": file, "input": f"{name}.input.pt"})

        ours = AdapterViT(ViTShape(**shape)).state_dict()
        keys_equal = list(ours) == list(state)
        shapes_equal = keys_equal and all(ours[k].shape == state[k].shape for k in ours)
        results.append(
            {
                "name": name,
                "shape": shape,
                "format": ext,
                "batch": 2,
                "state_dict_keys": len(state),
                "keys_identical_in_order": keys_equal,
                "shapes_identical": shapes_equal,
                "logit_scale": float(logits.abs().max()),
                "_logits": logits,
                "_cls": cls,
            }
        )
        del model
    (work / "cases.json").write_text(json.dumps(cases))

    ours = adapter_outputs(work)
    for r in results:
        o = ours[r["name"]]
        r["logits_max_abs_diff"] = max_diff(o["logits"], r.pop("_logits"))
        r["features_vs_cls_after_encoder_ln_max_abs_diff"] = max_diff(o["features"], r.pop("_cls"))
        r["tolerance"] = TOL_SAME_ENV
        r["pass"] = bool(
            r["keys_identical_in_order"]
            and r["shapes_identical"]
            and r["logits_max_abs_diff"] <= TOL_SAME_ENV
            and r["features_vs_cls_after_encoder_ln_max_abs_diff"] <= TOL_SAME_ENV
        )
    return results, cases, reference


def check_legacy(work: Path) -> dict:
    """mlp.0/mlp.3 -> mlp.linear_1/mlp.linear_2, saved as a plain dict (no version metadata), as
    pre-#6053 torchvision files are; torchvision renames them back on load, and so must load_vit."""
    from torchvision.models.vision_transformer import VisionTransformer

    from adapter.backbones.vit import ViTShape, load_vit

    shape = SMALL_SHAPES[1]
    model = torchvision_model(shape, seed=42)
    legacy = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
        for k, v in model.state_dict().items()
    }
    renamed = sum("linear_" in k for k in legacy)
    torch.save(legacy, work / "legacy.pth")
    x = torch.randn(2, 3, shape["image_size"], shape["image_size"])
    expected, _ = torchvision_run(model, x)

    tv = VisionTransformer(**shape)
    tv.load_state_dict(torch.load(work / "legacy.pth", weights_only=True))  # strict
    got_tv, _ = torchvision_run(tv.eval(), x)
    ours = load_vit(work / "legacy.pth", ViTShape(**shape))
    with torch.no_grad():
        got = ours(x)
    d_tv, d_ours = max_diff(got_tv, expected), max_diff(got, expected)
    return {
        "shape": shape,
        "renamed_keys": renamed,
        "torchvision_loads_it_strict": True,
        "torchvision_logits_max_abs_diff": d_tv,
        "load_vit_logits_max_abs_diff": d_ours,
        "tolerance": TOL_SAME_ENV,
        "pass": bool(renamed > 0 and d_ours <= TOL_SAME_ENV),
    }


def check_negative_control(work: Path) -> dict:
    """The comparison can fail: one bias element nudged by 1e-3 in the file must show up in the logits."""
    from adapter.backbones.vit import ViTShape, load_vit

    shape = SMALL_SHAPES[1]
    model = torchvision_model(shape, seed=7)
    x = torch.randn(2, 3, shape["image_size"], shape["image_size"])
    expected, _ = torchvision_run(model, x)
    state = model.state_dict()
    key = "encoder.layers.encoder_layer_0.mlp.3.bias"
    state[key] = state[key].clone()
    state[key][0] += 1e-3  # one element: a uniform shift of all of them would vanish in the next LayerNorm
    torch.save(state, work / "nudged.pth")
    with torch.no_grad():
        d = max_diff(load_vit(work / "nudged.pth", ViTShape(**shape))(x), expected)
    return {
        "nudge": "encoder_layer_0.mlp.3.bias[0] += 1e-3",
        "logits_max_abs_diff": d,
        "tolerance": TOL_SAME_ENV,
        "pass": bool(d > TOL_SAME_ENV),
    }


def test_images() -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for w, h in IMAGE_SIZES:
        # smooth gradients plus noise: both fine detail (tests the filter) and structure (tests the crop)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        px = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(px, "RGB"))
    return images


def check_preprocess() -> list:
    from torchvision.models import ViT_B_16_Weights
    from torchvision.transforms._presets import ImageClassification
    from torchvision.transforms.functional import pil_to_tensor

    from adapter.backbones.vit import RESIZE_RATIO, ViTShape, preprocess_images

    images = test_images()
    out, tensor_path = [], []
    reference = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    toy = ViTShape(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    toy_ref = ImageClassification(crop_size=32, resize_size=round(32 * RESIZE_RATIO))
    for label, shape, transform in [
        ("vit_b_16 (resize 256, crop 224)", ViTShape.vit_b_16(), reference),
        (f"toy 32px (resize {round(32 * RESIZE_RATIO)}, crop 32)", toy, toy_ref),
    ]:
        ours = preprocess_images(images, shape)
        for img, o in zip(images, ours):
            t = transform(img)
            d = max_diff(o, t) if o.shape == t.shape else float("inf")
            out.append(
                {
                    "transform": label,
                    "image_wh": list(img.size),
                    "shape_ours": list(o.shape),
                    "shape_torchvision": list(t.shape),
                    "max_abs_diff": d,
                    "tolerance": TOL_PREPROCESS,
                    "pass": bool(d <= TOL_PREPROCESS),
                }
            )
            if shape.image_size == 224:  # information only: the same transform fed a uint8 tensor, not PIL
                tensor_path.append(
                    {"image_wh": list(img.size), "max_abs_diff": max_diff(o, transform(pil_to_tensor(img)))}
                )
    return out, tensor_path


def check_cross_env(work: Path, repo_python: Path, cases: list, reference: dict) -> dict:
    if not repo_python.is_file():
        return {"skipped": f"{repo_python} not found"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [str(repo_python), str(Path(__file__).resolve()), "--worker", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode:
        return {"error": proc.stderr[-2000:], "pass": False}
    got = torch.load(work / "repo_env_outputs.pt", weights_only=True)
    rows = []
    for case in cases:
        d = max_diff(got[case["name"]]["logits"], reference[case["name"]])
        rows.append(
            {
                "name": case["name"],
                "logits_max_abs_diff": d,
                "tolerance": TOL_CROSS_ENV,
                "pass": bool(d <= TOL_CROSS_ENV),
            }
        )
    return {
        "python": str(repo_python),
        "versions": json.loads((work / "repo_env_versions.json").read_text()),
        "cases": rows,
        "pass": all(r["pass"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--repo-python",
        type=Path,
        default=REPO / ".venv" / "bin" / "python",
        help="the project's own interpreter, for the cross-environment check",
    )
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="tv-check-") as tmp:
        work = Path(tmp)
        models, cases, reference = check_models(work)
        legacy = check_legacy(work)
        negative = check_negative_control(work)
        preprocess, tensor_path = check_preprocess()
        cross = check_cross_env(work, a.repo_python, cases, reference)
    result = {
        "suite": "torchvision_check",
        "what": "adapter/backbones/vit.py vs the real torchvision VisionTransformer / vit_b_16 and its IMAGENET1K_V1 "
        "transforms; random weights, eval mode, fp32, CPU",
        "command": "PYTHONPATH=/work/main /tmp/tv-venv/bin/python bench/torchvision_check.py",
        "torchvision_env": {
            "python": sys.executable,
            **versions(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "tolerances": {
            "same_env_logits_and_features": TOL_SAME_ENV,
            "cross_env_logits": TOL_CROSS_ENV,
            "preprocess": TOL_PREPROCESS,
        },
        "models": models,
        "legacy_keys": legacy,
        "negative_control": negative,
        "preprocess": preprocess,
        "preprocess_tensor_input_info": {
            "note": "not pass/fail: torchvision's transform given a uint8 tensor (pil_to_tensor) instead of the "
            "PIL image resizes with its own antialiased kernel, not PIL's, so it differs from both",
            "vs_preprocess_images": tensor_path,
        },
        "cross_env": cross,
    }
    result["pass"] = bool(
        all(m["pass"] for m in models)
        and legacy["pass"]
        and negative["pass"]
        and all(p["pass"] for p in preprocess)
        and cross.get("pass", True)
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for m in models:
        print(
            f"{m['name']:20s} keys={m['keys_identical_in_order']} logits {m['logits_max_abs_diff']:.3g} "
            f"features {m['features_vs_cls_after_encoder_ln_max_abs_diff']:.3g} pass={m['pass']}"
        )
    print(f"legacy keys: load_vit {legacy['load_vit_logits_max_abs_diff']:.3g} pass={legacy['pass']}")
    print(f"negative control: {negative['logits_max_abs_diff']:.3g} pass={negative['pass']}")
    for p in preprocess:
        print(f"preprocess {p['transform']:32s} {tuple(p['image_wh'])}: {p['max_abs_diff']:.3g} pass={p['pass']}")
    for t in tensor_path:
        print(f"(info) tensor-input transform {tuple(t['image_wh'])}: {t['max_abs_diff']:.3g}")
    for r in cross.get("cases", []):
        print(f"cross-env {r['name']:20s} logits {r['logits_max_abs_diff']:.3g} pass={r['pass']}")
    if "cases" not in cross:
        print("cross-env:", cross)
    print(f"pass={result['pass']} -> {a.out}")


if __name__ == "__main__":
    main()
