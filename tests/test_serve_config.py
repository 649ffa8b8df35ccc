"""The serving config: one schema composed from adapter/'s types, fed by YAML args, dotted
command-line args and a config file; relative paths resolve against the project root."""

import pytest
import yaml
from pydantic import ValidationError

from adapter.decoding import SamplingParams
from adapter.settings import ROOT_ENV, ModelSource
from serve.serve_config import ServeConfig, serve_config
from tests.conftest import ROOT

MODEL = {"base": "../shared/data/stories260K", "tokenizer": "../shared/data/stories260K/tokenizer.model"}


def test_sections_are_adapters_own_types_with_their_defaults():
    cfg = serve_config({"model": MODEL})
    assert isinstance(cfg.model, ModelSource) and isinstance(cfg.sampling, SamplingParams)
    # The request defaults are SamplingParams' own (docs/method.md: 0.1 / 0.75), not a copy in serve/.
    assert (cfg.sampling.temperature, cfg.sampling.top_p) == (SamplingParams().temperature, SamplingParams().top_p)


def test_dotted_command_line_args_are_read_as_yaml_scalars():
    cfg = serve_config(
        {
            "model.base": "/m",
            "model.tokenizer": "/t.model",
            "model.dtype": "bfloat16",
            "sampling.temperature": "0",
            "max_n": "2",
            "api_key_env": "KEY",
            "adapters": "runs",
        }
    )
    assert cfg.model.base == "/m" and cfg.model.dtype == "bfloat16"
    assert cfg.sampling.temperature == 0.0 and cfg.max_n == 2 and cfg.adapters == "runs"


def test_config_file_is_overridden_by_nested_then_dotted_args(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "max_batch_size": 4, "sampling": {"top_p": 0.5}}))
    cfg = serve_config({"config": str(path), "sampling": {"temperature": 0.3}, "sampling.max_gen_len": "9"})
    assert cfg.max_batch_size == 4 and cfg.model.base == MODEL["base"]
    assert (cfg.sampling.top_p, cfg.sampling.temperature, cfg.sampling.max_gen_len) == (0.5, 0.3, 9)


@pytest.mark.parametrize(
    "args",
    [
        {"model": MODEL, "max_batch_szie": 4},  # a typo is an error, not a default
        {"model": MODEL, "sampling": {"temperature": float("nan")}},  # SamplingParams' own checks
        {"model": {"tokenizer": "t.model"}},  # no base and no preset
        {"base": "/m", "tokenizer": "/t"},  # the old flat keys
    ],
)
def test_bad_serve_config_is_refused(args):
    with pytest.raises(ValidationError):
        serve_config(args)


def test_relative_paths_resolve_against_the_project_root(tmp_path, monkeypatch):
    from serve.app import resolved_paths

    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.chdir("/")
    cfg = serve_config({"model": MODEL, "adapters": "runs"})
    paths = resolved_paths(cfg)
    assert paths["adapters"] == str(tmp_path / "runs")
    assert paths["model.base"] == str((tmp_path / MODEL["base"]).resolve())
    assert serve_config({"model": MODEL, "adapters": "s3://bucket/adapters"}).adapters == "s3://bucket/adapters"


def test_serve_yaml_files_hold_valid_app_args_and_autoscaling_lives_only_there():
    from ray.serve.schema import ServeDeploySchema

    import serve.app

    for name in ("config.yaml", "local.yaml"):
        raw = yaml.safe_load((ROOT / "serve" / name).read_text())
        app = ServeDeploySchema.parse_obj(raw).applications[0]
        assert isinstance(serve_config(app.args), ServeConfig)
        auto = raw["applications"][0]["deployments"][0].get("autoscaling_config")
        assert auto is None or auto["max_replicas"] >= auto["min_replicas"]
    # The code sets no replica counts of its own (the YAML is the one place).
    cfg = serve.app.AdapterServer._deployment_config
    assert cfg.autoscaling_config is None


def test_cuda_replicas_request_a_gpu_and_cpu_ones_do_not():
    from serve.app import deployment_for

    gpu = deployment_for(serve_config({"model": {**MODEL, "device": "cuda"}}))
    cpu = deployment_for(serve_config({"model": {**MODEL, "device": "cpu"}}))
    assert gpu.ray_actor_options.get("num_gpus") == 1
    assert not (cpu.ray_actor_options or {}).get("num_gpus")


def test_api_key_env_named_but_unset_or_empty_refuses_to_start(monkeypatch):
    from serve.app import api_key_from_env

    monkeypatch.delenv("SERVE_TEST_KEY", raising=False)
    named = serve_config({"model": MODEL, "api_key_env": "SERVE_TEST_KEY"})
    with pytest.raises(RuntimeError, match="SERVE_TEST_KEY.*unset or empty"):
        api_key_from_env(named)
    monkeypatch.setenv("SERVE_TEST_KEY", "")
    with pytest.raises(RuntimeError, match="unset or empty"):
        api_key_from_env(named)
    monkeypatch.setenv("SERVE_TEST_KEY", "k3y")
    assert api_key_from_env(named) == "k3y"
    assert api_key_from_env(serve_config({"model": MODEL})) is None


def test_no_literal_api_key_in_the_shipped_serve_configs():
    for name in ("config.yaml", "local.yaml"):
        app = yaml.safe_load((ROOT / "serve" / name).read_text())["applications"][0]
        assert "env_vars" not in (app.get("runtime_env") or {}), name
