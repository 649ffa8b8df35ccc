"""End to end on CPU: ONE short Ray Train run of a tiny multimodal adapter (real TinyStories-260K
base, toy random CLIP tower) on coco-mini's train images through `pipelines.train`; then the COCO
evaluation job scores its captions on coco-mini val, the ScienceQA job scores the shared problems'
test split (images drawn into the official layout), and `adapter.generate --image` runs it.
Numbers are low by construction; the tests check the machinery and record what was measured."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapter.adapter_file import load_adapter
from adapter.checkpoint import load_base
from adapter.vision import ImageEncoder, features_for, save_random_encoder
from pipelines.coco import read_captions
from pipelines.config import TrainConfig
from tests.conftest import shared_file
from tests.test_scienceqa import draw_images
from tests.test_vision import png


def coco_layout(root, n_train: int):
    """coco-mini's real annotations and images (linked), with the 2nd train image corrupt and the 3rd missing."""
    src = shared_file("coco-mini/annotations").parent
    shutil.copytree(src / "annotations", root / "annotations")
    (root / "val2017").symlink_to(src / "val2017")
    (root / "train2017").mkdir()
    for k, it in enumerate(read_captions(src / "annotations" / "captions_train2017.json")[:n_train]):
        if k == 1:
            (root / "train2017" / it["file"]).write_bytes(b"\xff\xd8\xff not a jpeg")
        elif k != 2:
            (root / "train2017" / it["file"]).symlink_to(src / "train2017" / it["file"])
    return root


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    from pipelines.train import run

    tmp = tmp_path_factory.mktemp("mm")
    encoder = save_random_encoder(tmp / "tiny-clip")
    coco = coco_layout(tmp / "coco", n_train=24)
    stories = shared_file("stories260K/params.json").parent
    cfg = TrainConfig.model_validate({
        "name": "mm", "output_dir": str(tmp / "runs"), "task": "coco",
        "model": {"base": str(stories), "tokenizer": str(stories / "tokenizer.model"),
                  "adapter": {"adapter_len": 4, "adapter_layers": 3}},
        "vision": {"encoder": str(encoder), "feature_layers": [1, 3], "proj_hidden": 16},
        "data": {"source": str(coco), "out": str(tmp / "data"), "max_seq_len": 192, "limit": 24},
        "optim": {"recipe": "custom", "lr": 0.02, "epochs": 1, "warmup_epochs": 0.1, "micro_batch_size": 4},
        "workers": {"num_workers": 2, "cpus_per_worker": 0.5},
        "checkpoint": {"keep": 1},
        "samples": {"instructions": ["Generate a caption for this image."],
                    "sampling": {"max_gen_len": 4, "temperature": 0}},
        "stop_at_step": 10,
        "evaluation": {"split": "val", "batch_size": 64, "max_gen_len": 12},
    })
    return cfg, run(cfg), tmp


def test_multimodal_training_moves_gates_and_projection_and_keeps_the_encoder(trained):
    cfg, summary, _ = trained
    stats = json.loads(open(f"{cfg.data.out}/stats.json").read())
    train = read_captions(shared_file("coco-mini/annotations/captions_train2017.json"))[:24]
    assert stats["rejected_by_reason"] == {"image_corrupt": len(train[1]["captions"]),
                                           "image_missing": len(train[2]["captions"])}
    assert stats["train_records"] == sum(len(i["captions"]) for i in train) - stats["records_rejected"]
    val = [json.loads(x) for x in open(summary["metrics"]) if '"val"' in x]
    assert summary["steps"] == 10 and val[0]["step"] == 0 and val[-1]["step"] == 10
    assert val[-1]["val_loss"] < val[0]["val_loss"], val
    print(f"\n[measured] coco-mini held-out loss {val[0]['val_loss']:.3f} -> {val[-1]['val_loss']:.3f} in 10 steps")
    base = load_base(cfg.model.base)
    encoder = ImageEncoder(cfg.vision)
    adapter = load_adapter(summary["adapter"], base.args, encoder=encoder.identity)
    assert adapter.gate.abs().mean() > 1e-3 and adapter.projection is not None
    feats, present = features_for(encoder, [png((0, 0, 255)), png((250, 250, 0), pattern=20)])
    tokens = torch.tensor([[1, 50, 60, 70, 80]] * 2)
    with torch.no_grad():
        logits = base(tokens, prefixes=adapter.prefixes(base, adapter.image_tokens(feats, present)))
    assert not torch.allclose(logits[0], logits[1], atol=1e-5)


def test_coco_evaluation_scores_captions_on_coco_mini_val(trained):
    from pipelines.evaluate_coco import run

    cfg, _, _ = trained
    result = run(cfg)
    assert result["images"] == 79 and not result["errors"]
    assert set(result["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"}
    assert all(0 <= v <= 10 for v in result["metrics"].values())
    lines = [json.loads(x) for x in open(f"{result['out']}/predictions.jsonl")]
    assert len(lines) == 79 and all(len(x["references"]) >= 5 for x in lines)
    assert len(json.load(open(f"{result['out']}/captions.json"))) == 79
    print(f"\n[measured] coco-mini val x100: {result['metrics_x100']}, {result['images_per_s']} images/s, "
          f"e.g. {lines[0]['caption']!r}")


def test_scienceqa_evaluation_scores_the_shared_test_split(trained):
    from pipelines.evaluate_scienceqa import run

    cfg, summary, tmp = trained
    src = shared_file("scienceqa/problems.json").parent
    drawn = draw_images(src, tmp / "sqa-images", splits=("test",))
    sqa = cfg.model_copy(update={
        "task": "scienceqa", "data": cfg.data.model_copy(update={"source": str(src), "out": str(tmp / "sqa")}),
        "scienceqa": cfg.scienceqa.model_copy(update={"images": str(tmp / "sqa-images")}),
        "evaluation": cfg.evaluation.model_copy(update={"adapter": summary["adapter"], "split": "test"})})
    result = run(sqa)
    assert result["problems"] + len(result["set_aside"]) == 361 and result["with_image"] == drawn > 0
    acc = result["accuracy"]
    assert acc["Avg"]["total"] == result["problems"]
    assert acc["IMG"]["total"] + acc["NO"]["total"] <= result["problems"]
    preds = [json.loads(x) for x in open(f"{result['out']}/predictions.jsonl")]
    assert len(preds) == result["problems"]
    assert sum(result["parse_results"].values()) == result["problems"]
    assert {p["pid"] for p in preds if p["parse"] != "ok"} == set(result["wrong_unparseable"])
    assert all(not p["correct"] for p in preds if p["parse"] != "ok")
    table = open(f"{result['out']}/table.md").read()
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in table
    print(f"\n[measured] ScienceQA test ({result['problems']} problems, {drawn} drawn images): "
          f"{acc['Avg']['accuracy']}% avg, parse {result['parse_results']}, {result['problems_per_s']} problems/s\n"
          + table)


def test_generate_cli_with_an_image(trained, tmp_path, capsys):
    from adapter.adapter_file import save_adapter
    from adapter.adapter import AdapterConfig, AdaptionPrompts
    from adapter.generate import main

    cfg, summary, tmp = trained
    image = tmp_path / "blue.png"
    image.write_bytes(png((0, 0, 255)))
    common = ["--base", cfg.model.base, "--tokenizer", cfg.model.tokenizer, "--temperature", "0",
              "--max-gen-len", "6", "--instruction", "Generate a caption for this image."]
    out = main([*common, "--adapter", summary["adapter"], "--image", str(image), "--encoder", cfg.vision.encoder])
    assert len(out) == 1 and isinstance(out[0], str)
    # Without --encoder: the folder the training job recorded in training.json.
    assert main([*common, "--adapter", summary["adapter"], "--image", str(image)]) == out
    other = save_random_encoder(tmp_path / "other-clip", seed=3)
    with pytest.raises(SystemExit):
        main([*common, "--adapter", summary["adapter"], "--image", str(image), "--encoder", str(other)])
    assert "trained with image encoder 'tiny-clip'" in capsys.readouterr().err
    base = load_base(cfg.model.base)
    text_only = save_adapter(AdaptionPrompts(base.args, AdapterConfig(4, 3)), base.args, tmp_path / "t")
    with pytest.raises(SystemExit):
        main([*common, "--adapter", str(text_only), "--image", str(image), "--encoder", cfg.vision.encoder])
    assert "text-only adapter" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(SystemExit):
        main([*common, "--adapter", summary["adapter"], "--image", str(tmp_path / "bad.png"),
              "--encoder", cfg.vision.encoder])
    assert "not a readable image" in capsys.readouterr().err
