"""The one config system: one setting in one place reaches every consumer; paths resolve by the
project-root rule; bad settings are refused with a message that names them. No Ray here."""

import os

import pytest
import torch

from adapter.adapter import AdapterConfig, AdaptionPrompts
from adapter.adapter_file import read_metadata, save_adapter
from adapter.decoding import SamplingParams
from adapter.loader import load_model
from adapter.model_args import preset
from adapter.settings import ModelSource, load_config, project_path
from pipelines.data.folders import replace_dir
from pipelines.job_config import PreprocessConfig, TrainConfig
from tests.conftest import ROOT, shared_file


def test_recipes_take_their_learning_rate_from_blr_or_lr():
    paper = load_config(TrainConfig, "llama7b-alpaca-8xa100-paper", ["optim.blr=0.004"])
    assert paper.optim.peak_lr(world_size=8) == 0.004  # the paper's lr is absolute: blr itself
    script = load_config(TrainConfig, "llama7b-alpaca-8xa100")
    assert script.optim.peak_lr(world_size=8) == pytest.approx(9e-3 * 4 * 8 / 256)
    assert load_config(TrainConfig, "tiny-cpu", ["optim.lr=0.3"]).optim.peak_lr(world_size=2) == 0.3
    with pytest.raises(Exception, match="needs optim.lr"):
        load_config(TrainConfig, "tiny-cpu", ["optim.lr=null"])


def test_adapter_section_is_the_adapters_own_config_and_reaches_prompts_and_file(tmp_path):
    cfg = load_config(TrainConfig, "tiny-cpu", ["model.adapter.adapter_len=3", "model.adapter.init_std=0.5"])
    assert isinstance(cfg.model.adapter, AdapterConfig) and cfg.model.adapter.adapter_len == 3
    args = preset("tiny")
    torch.manual_seed(0)
    prompts = AdaptionPrompts(args, cfg.model.adapter)
    assert prompts.prompt.shape[1] == 3
    assert prompts.prompt.std().item() == pytest.approx(0.5, rel=0.1)
    save_adapter(prompts, args, tmp_path)
    assert read_metadata(tmp_path)["adapter_config"]["adapter_len"] == 3
    with pytest.raises(Exception, match="adapter_lenn"):
        load_config(TrainConfig, "tiny-cpu", ["model.adapter.adapter_lenn=3"])
    with pytest.raises(Exception, match="adapter_len and adapter_layers must be >= 1"):
        load_config(TrainConfig, "tiny-cpu", ["model.adapter.adapter_len=0"])


def test_prompts_start_at_the_authors_scale_by_default():
    """The authors' prompts are an nn.Embedding: N(0, 1), not N(0, 0.02)."""
    torch.manual_seed(0)
    p = AdaptionPrompts(preset("tiny"), AdapterConfig())
    assert p.prompt.std().item() == pytest.approx(1.0, rel=0.05)


def test_tokenizer_belongs_to_the_model_section():
    cfg = load_config(TrainConfig, "tiny-cpu")
    assert cfg.model.tokenizer.endswith("stories260K/tokenizer.model")
    with pytest.raises(Exception, match="tokenizer"):
        load_config(TrainConfig, "tiny-cpu", ["data.tokenizer=x.model"])


def test_max_seq_len_beyond_the_models_context_is_refused():
    from pipelines.data.instructions import check_context

    cfg = PreprocessConfig(
        model={"preset": "tiny", "tokenizer": "t.model"}, data={"source": "x.json", "out": "o", "max_seq_len": 512}
    )
    with pytest.raises(ValueError, match="max_seq_len 512 is longer than the model's context of 256"):
        check_context(cfg)


def test_preprocess_job_reads_a_training_config(capsys):
    from pipelines.preprocess import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "tiny-cpu", "--set", "data.limit=7", "--print-config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "limit: 7" in printed


def test_sampling_params_refuse_nan_and_infinity():
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
    cfg = load_config(TrainConfig, "tiny-cpu", ["samples.sampling.max_gen_len=5"])
    assert cfg.samples.sampling == SamplingParams(max_gen_len=5, temperature=0.0)


def test_loader_checks_that_tokenizer_and_model_belong_together():
    stories = shared_file("stories260K/params.json").parent
    loaded = load_model(ModelSource(base=str(stories), tokenizer=str(stories / "tokenizer.model")))
    assert loaded.base.args.vocab_size == loaded.tokenizer.vocab_size == 512
    assert loaded.dtype == torch.float32 and "pretrained" in loaded.note
    with pytest.raises(ValueError, match="32000 pieces but the model's vocabulary is 512"):
        load_model(ModelSource(base=str(stories), tokenizer=str(shared_file("tokenizer.model"))))


def test_random_fallback_is_built_in_the_working_dtype_and_says_so(tmp_path):
    stories_tok = shared_file("stories260K/tokenizer.model")
    loaded = load_model(
        ModelSource(base=str(tmp_path / "missing"), preset="tiny", tokenizer=str(stories_tok), dtype="bfloat16")
    )
    assert loaded.base.tok_embeddings.weight.dtype == torch.bfloat16
    assert "RANDOM-INITIALISED" in loaded.note and not any(p.requires_grad for p in loaded.base.parameters())


def test_generate_cli_uses_the_same_loader():
    from adapter.generate import main

    stories = shared_file("stories260K/params.json").parent
    out = main(
        [
            "--base",
            str(stories),
            "--tokenizer",
            str(stories / "tokenizer.model"),
            "--prompt",
            "Once upon a time",
            "--max-gen-len",
            "5",
            "--temperature",
            "0",
        ]
    )
    assert len(out) == 1 and out[0]
    with pytest.raises(SystemExit):
        main(["--base", str(stories), "--tokenizer", str(shared_file("tokenizer.model")), "--prompt", "x"])


def test_relative_paths_resolve_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLAMA_ADAPTER_ROOT", raising=False)
    assert project_path("runs/x") == str(tmp_path / "runs" / "x")
    assert project_path("/abs/p") == "/abs/p" and project_path("s3://b/k") == "s3://b/k"
    monkeypatch.setenv("LLAMA_ADAPTER_ROOT", str(tmp_path / "root"))
    assert project_path("runs") == str(tmp_path / "root" / "runs")


def test_inside_rays_working_dir_copy_paths_resolve_to_the_installed_project(tmp_path, monkeypatch):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("LLAMA_ADAPTER_ROOT", raising=False)
    import adapter.settings as settings

    if settings._editable_source() is None:
        pytest.skip("the project is not installed with `pip install -e .` here")
    assert project_path("runs") == str(ROOT / "runs")  # never inside the copy
    monkeypatch.setattr(settings, "_editable_source", lambda: None)
    with pytest.raises(RuntimeError, match="LLAMA_ADAPTER_ROOT"):
        project_path("runs")


def test_an_output_folder_is_never_lost_while_being_replaced(tmp_path, monkeypatch):
    target, new = tmp_path / "out", tmp_path / "out.tmp"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated crash between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError):
        replace_dir(new, target)
    kept = [p for p in tmp_path.iterdir() if (p / "old.txt").is_file()]
    assert kept and (new / "new.txt").is_file(), "a crash mid-swap must leave both folders on disk"
    monkeypatch.setattr(os, "replace", real_replace)
    shutil_target = tmp_path / "out2"
    shutil_target.mkdir()
    (shutil_target / "old.txt").write_text("old")
    replace_dir(new, shutil_target)
    assert (shutil_target / "new.txt").is_file() and not (shutil_target / "old.txt").exists()
    assert not list(tmp_path.glob("out2.old-*"))


def test_jobs_refuse_an_unknown_task_with_the_list_of_known_ones(capsys):
    from pipelines.preprocess import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "scienceqa-tiny-cpu", "--set", "task=sciencqa"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown task 'sciencqa'" in err
    assert "alpaca, scienceqa, coco, image-classification, squad" in err


def test_a_section_of_the_other_model_family_is_refused():
    from pipelines.job_config import TrainConfig
    from pipelines.tasks import task_for

    with pytest.raises(ValueError, match="remove the `encoder` section"):
        task_for(load_config(TrainConfig, "tiny-cpu", ["encoder.weights=vit.safetensors"]))
    with pytest.raises(ValueError, match="remove the `model` section"):
        task_for(load_config(TrainConfig, "vit-digits-tiny-cpu", ["model.base=x", "model.tokenizer=y"]))
    with pytest.raises(ValueError, match="doc_stride"):
        task_for(load_config(TrainConfig, "vit-digits-tiny-cpu", ["task=squad", "encoder.doc_stride=300"]))
    with pytest.raises(ValueError, match="needs a `vision` section"):
        task_for(load_config(TrainConfig, "coco-tiny-cpu", ["vision=null"]))
