"""cluster.yaml passes Ray's own cluster-config validation, and the job configs parse."""

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from adapter.settings import CONFIG_DIR, load_config
from pipelines.job_config import TrainConfig

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_validation():
    cfg = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    assert cfg["available_node_types"]["a100x8"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert ray.__version__ in cfg["docker"]["image"], "cluster image and local Ray must match"
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_rays_validation_would_catch_a_broken_cluster_yaml():
    cfg = yaml.safe_load(CLUSTER.read_text())
    cfg["available_node_types"]["a100x8"]["node_config"] = "p4d.24xlarge"
    with pytest.raises(Exception, match="not of type"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_job_config_parses(path):
    if path.stem.startswith("serve"):
        pytest.skip("serving config, checked in test_serve")
    cfg = load_config(TrainConfig, path)
    assert cfg.name


def test_overrides_are_typed_and_unknown_keys_refused():
    cfg = load_config(TrainConfig, "tiny-cpu", ["optim.epochs=0.5", "workers.num_workers=3"])
    assert cfg.optim.epochs == 0.5 and cfg.workers.num_workers == 3
    with pytest.raises(Exception, match="extra"):
        load_config(TrainConfig, "tiny-cpu", ["optim.epochz=1"])
    with pytest.raises(Exception):
        load_config(TrainConfig, "tiny-cpu", ["optim.micro_batch_size=zero"])


def test_training_without_a_held_out_split_is_refused():
    with pytest.raises(Exception, match="held-out split"):
        load_config(TrainConfig, "tiny-cpu", ["data.val_fraction=0"])
