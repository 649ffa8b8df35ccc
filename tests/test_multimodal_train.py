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
from adapter.base_weights import load_base
from adapter.image_encoder import ImageEncoder, features_for, save_random_encoder
from pipelines.job_config import TrainConfig
from pipelines.tasks.coco import read_captions
from tests.conftest import shared_file
from tests.test_image_encoder import png
from tests.test_scienceqa import draw_images

# Module fixtures run whole Ray Train jobs: one took 318 s while a benchmark shared the 2 cores, past
# the 300 s default of pyproject.toml.
pytestmark = pytest.mark.timeout(900)


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
    cfg = TrainConfig.model_validate(
        {
            "name": "mm",
            "output_dir": str(tmp / "runs"),
            "task": "coco",
            "model": {
                "base": str(stories),
                "tokenizer": str(stories / "tokenizer.model"),
                "adapter": {"adapter_len": 4, "adapter_layers": 3},
            },
            "vision": {"encoder": str(encoder), "feature_layers": [1, 3], "proj_hidden": 16},
            "data": {"source": str(coco), "out": str(tmp / "data"), "max_seq_len": 192, "limit": 24},
            "optim": {"recipe": "custom", "lr": 0.02, "epochs": 1, "warmup_epochs": 0.1, "micro_batch_size": 4},
            "workers": {"num_workers": 2, "cpus_per_worker": 0.5},
            "checkpoint": {"keep": 1},
            "samples": {
                "instructions": ["Generate a caption for this image."],
                "sampling": {"max_gen_len": 4, "temperature": 0},
            },
            "stop_at_step": 10,
            "evaluation": {"split": "val", "batch_size": 64, "max_gen_len": 12},
        }
    )
    return cfg, run(cfg), tmp


def test_multimodal_training_moves_gates_and_projection_and_keeps_the_encoder(trained):
    cfg, summary, _ = trained
    stats = json.loads(open(f"{cfg.data.out}/stats.json").read())
    train = read_captions(shared_file("coco-mini/annotations/captions_train2017.json"))[:24]
    assert stats["rejected_by_reason"] == {
        "image_corrupt": len(train[1]["captions"]),
        "image_missing": len(train[2]["captions"]),
    }
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
    from pipelines.evaluate import run

    cfg, _, _ = trained
    result = run(cfg)
    assert result["images"] == 79 and not result["errors"]
    assert set(result["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"}
    assert all(0 <= v <= 10 for v in result["metrics"].values())
    lines = [json.loads(x) for x in open(f"{result['out']}/predictions.jsonl")]
    assert len(lines) == 79 and all(len(x["references"]) >= 5 for x in lines)
    assert len(json.load(open(f"{result['out']}/captions.json"))) == 79
    print(
        f"\n[measured] coco-mini val x100: {result['metrics_x100']}, {result['images_per_s']} images/s, "
        f"e.g. {lines[0]['caption']!r}"
    )


def test_scienceqa_evaluation_scores_the_shared_test_split(trained):
    from pipelines.evaluate import run

    cfg, summary, tmp = trained
    src = shared_file("scienceqa/problems.json").parent
    drawn = draw_images(src, tmp / "sqa-images", splits=("test",))
    sqa = cfg.model_copy(
        update={
            "task": "scienceqa",
            "data": cfg.data.model_copy(update={"source": str(src), "out": str(tmp / "sqa")}),
            "scienceqa": cfg.scienceqa.model_copy(update={"images": str(tmp / "sqa-images")}),
            "evaluation": cfg.evaluation.model_copy(update={"adapter": summary["adapter"], "split": "test"}),
        }
    )
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
    print(
        f"\n[measured] ScienceQA test ({result['problems']} problems, {drawn} drawn images): "
        f"{acc['Avg']['accuracy']}% avg, parse {result['parse_results']}, {result['problems_per_s']} problems/s\n"
        + table
    )


def test_generate_cli_with_an_image(trained, tmp_path, capsys):
    from adapter.adapter import AdapterConfig, AdaptionPrompts
    from adapter.adapter_file import save_adapter
    from adapter.generate import main

    cfg, summary, tmp = trained
    image = tmp_path / "blue.png"
    image.write_bytes(png((0, 0, 255)))
    common = [
        "--base",
        cfg.model.base,
        "--tokenizer",
        cfg.model.tokenizer,
        "--temperature",
        "0",
        "--max-gen-len",
        "6",
        "--instruction",
        "Generate a caption for this image.",
    ]
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
        main(
            [
                *common,
                "--adapter",
                summary["adapter"],
                "--image",
                str(tmp_path / "bad.png"),
                "--encoder",
                cfg.vision.encoder,
            ]
        )
    assert "not a readable image" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served(trained, server):
    """The trained multimodal adapter behind the Serve app (a third app beside the session's two),
    with the tiny CLIP tower as the server's encoder and a text-only adapter in the same root."""
    from ray import serve

    from adapter.adapter import AdapterConfig, AdaptionPrompts
    from adapter.adapter_file import save_adapter
    from serve.app import build_app

    cfg, summary, tmp = trained
    base = load_base(cfg.model.base)
    save_adapter(AdaptionPrompts(base.args, AdapterConfig(4, 3)), base.args, tmp / "runs" / "plain.safetensors")
    # Ten steps barely move the text; a copy with open gates and a loud image token makes the
    # image decide the output, so "the server used the image" can be told from the text alone.
    loud = load_adapter(summary["adapter"], base.args)
    with torch.no_grad():
        loud.gate.fill_(3.0)
        loud.projection.norm.weight.mul_(30)
    save_adapter(loud, base.args, tmp / "runs" / "mm-loud.safetensors", extra={"task": "coco"})
    app_cfg = {
        "model": {"base": cfg.model.base, "tokenizer": cfg.model.tokenizer},
        "adapters": str(tmp / "runs"),
        "base_name": "stories260k",
        "vision": cfg.vision.model_dump(mode="json"),
        "max_image_bytes": 300_000,
        "sampling": {"max_gen_len": 8, "temperature": 0.0},
    }
    serve.run(build_app(app_cfg), name="mm", route_prefix="/mm")
    yield f"{server}/mm"
    serve.delete("mm")


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_chat(model: str, url: str, text: str = "Generate a caption for this image.") -> dict:
    return {
        "model": model,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    }


def test_served_multimodal_adapter_answers_an_image_url_request_over_http(trained, served):
    openai = pytest.importorskip("openai", reason="the openai client is a test-only dependency")
    from adapter.decoding import SamplingParams, generate
    from adapter.prompts import format_prompt
    from adapter.tokenizer import Tokenizer

    cfg, summary, tmp = trained
    jpeg = sorted((shared_file("coco-mini/val2017/000000000139.jpg").parent).glob("*.jpg"))[0].read_bytes()
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused")
    listed = {m.id: m.model_extra.get("multimodal") for m in client.models.list().data}
    assert (
        listed["mm"] is True
        and listed["mm-loud"] is True
        and listed["plain"] is False
        and listed["stories260k"] is False
    ), listed
    assert client.chat.completions.create(**image_chat("mm", data_uri(jpeg))).choices[0].message.content
    reply = client.chat.completions.create(**image_chat("mm-loud", data_uri(jpeg)))
    served_text = reply.choices[0].message.content
    # The same request computed here with the same image: the server really used the image.
    base, tok = load_base(cfg.model.base), Tokenizer(cfg.model.tokenizer)
    encoder = ImageEncoder(cfg.vision)
    adapter = load_adapter(tmp / "runs" / "mm-loud.safetensors", base.args, encoder=encoder.identity)
    feats, _ = features_for(encoder, [jpeg])
    with torch.no_grad():
        with_image = adapter.prefixes(base, adapter.image_tokens(feats))
        without = adapter.prefixes(base)
    assert not torch.equal(with_image[base.args.n_layers - 1].k, without[base.args.n_layers - 1].k)
    prompt = tok.encode(format_prompt("Generate a caption for this image."), bos=True)
    local = generate(base, [prompt], SamplingParams(max_gen_len=8, temperature=0.0), tok.eos_id, adapters=[with_image])[
        0
    ]
    assert served_text == tok.decode(local), (served_text, tok.decode(local))
    blind = tok.decode(
        generate(base, [prompt], SamplingParams(max_gen_len=8, temperature=0.0), tok.eos_id, adapters=[without])[0]
    )
    assert blind != served_text  # so the equality above could only hold with the image
    print(
        f"\n[measured] served caption for {len(jpeg):,}-byte COCO image: {served_text!r} (without the image: {blind!r})"
    )


def test_image_requests_are_refused_with_a_message_and_neighbours_are_unaffected(trained, served):
    import concurrent.futures

    import httpx

    jpeg = shared_file("coco-mini/val2017/000000000802.jpg").read_bytes()
    ok = image_chat("mm", data_uri(jpeg))
    text_row = {
        "model": "mm",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Generate a caption for this image."}],
    }
    bad = {
        "remote URL": (image_chat("mm", "https://example.com/cat.jpg"), 400, "remote image URLs are not fetched"),
        "text-only adapter": (image_chat("plain", data_uri(jpeg)), 400, "text-only adapter"),
        "base model": (image_chat("stories260k", data_uri(jpeg)), 400, "cannot take images"),
        "corrupt image": (image_chat("mm", data_uri(b"\xff\xd8\xff not a jpeg")), 400, "image: JPEG is"),
        "truncated image": (image_chat("mm", data_uri(jpeg[: len(jpeg) // 2])), 400, "JPEG is truncated"),
        "oversized image": (image_chat("mm", data_uri(b"\0" * 400_000)), 400, "larger than this server's limit"),
        "not base64": (image_chat("mm", "data:image/png;base64,@@@@"), 400, "not valid base64"),
        "not an image type": (image_chat("mm", data_uri(jpeg, "text/html")), 400, "not image/*"),
        "two images": (
            {
                **ok,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_uri(jpeg)}},
                            {"type": "image_url", "image_url": {"url": data_uri(jpeg)}},
                        ],
                    }
                ],
            },
            400,
            "one image per request",
        ),
        "unknown part": (
            {
                **ok,
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
                ],
            },
            400,
            "input_audio",
        ),
        "body over the limit": (image_chat("mm", data_uri(b"\0" * 900_000)), 413, ""),
    }
    with httpx.Client(timeout=120) as http, concurrent.futures.ThreadPoolExecutor(8) as pool:
        solo = {
            "image": http.post(f"{served}/v1/chat/completions", json=ok).json(),
            "text": http.post(f"{served}/v1/chat/completions", json=text_row).json(),
        }
        # Valid image and text rows in flight together with every bad request.
        futures = {k: pool.submit(http.post, f"{served}/v1/chat/completions", json=b) for k, (b, _, _) in bad.items()}
        good = [pool.submit(http.post, f"{served}/v1/chat/completions", json=b) for b in (ok, text_row) * 3]
        for name, (_, status, message) in bad.items():
            r = futures[name].result()
            assert r.status_code == status, (name, r.status_code, r.text)
            assert message in r.json()["error"]["message"], (name, r.text)
        answers = [g.result() for g in good]
    assert all(r.status_code == 200 for r in answers)
    texts = [r.json()["choices"][0]["message"]["content"] for r in answers]
    expected = [solo["image"]["choices"][0]["message"]["content"], solo["text"]["choices"][0]["message"]["content"]]
    assert texts == expected * 3
    batches = [max(int(x) for x in r.headers["x-batch-size"].split(",")) for r in answers]
    assert max(batches) > 1, batches  # image and text rows shared decoding steps


def test_playground_sends_the_chosen_image_to_a_multimodal_adapter(trained, served, tmp_path):
    """The page shows its image control for the multimodal adapter and sends the file inline;
    its answer is the API's answer to the same image (headless Chromium, as tests/test_playground.py)."""
    import httpx

    from tests.test_playground import ARGS, CHROMIUM, SHOTS

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    if not shutil.os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: Debian's chromium is installed by .ci/run")
    jpeg = shared_file("coco-mini/val2017/000000000802.jpg")
    expected = httpx.post(
        f"{served}/v1/chat/completions",
        timeout=120,
        json={**image_chat("mm", data_uri(jpeg.read_bytes())), "max_tokens": 12},
    ).json()["choices"][0]["message"]["content"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(served + "/")
        page.wait_for_function("document.querySelectorAll('#model-a option').length > 0", timeout=30_000)
        page.select_option("#model-a", "plain")
        assert page.is_hidden("#image-label")
        page.select_option("#model-a", "mm")
        assert page.is_visible("#image-label")
        page.set_input_files("#image", str(jpeg))
        page.fill("#instruction", "Generate a caption for this image.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.click("#send")
        page.wait_for_function(
            "document.querySelector('#out-a .status').textContent.startsWith('done')", timeout=60_000
        )
        assert not page.text_content("#out-a .error")
        shown = page.text_content("#out-a .text")
        page.screenshot(path=str(SHOTS / "image.png"))
        browser.close()
    assert shown == expected, (shown, expected)
