"""The cluster-launcher YAMLs pass Ray's own config checks, offline, and keep their promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = ["gpu.yaml", "gpu-gcp.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_passes_ray_prepare_and_validate(name):
    prepared = prepare_config(load(name))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    # a GPU worker type and a CPU-only worker type for Ray Data, resources stated explicitly
    # (without them the autoscaler asks the cloud API for each instance type)
    for node_type in types.values():
        assert {"CPU", "GPU"} <= set(node_type["resources"]), node_type
    workers = [t for n, t in types.items() if n != prepared["head_node_type"]]
    assert any(t["resources"]["GPU"] > 0 for t in workers)
    assert any(t["resources"]["GPU"] == 0 and t["resources"]["CPU"] > 0 for t in workers)


@pytest.mark.parametrize("name", YAMLS)
def test_validation_catches_a_broken_yaml(name):
    """The check above is not vacuous: the same validator rejects a mistyped field."""
    broken = copy.deepcopy(load(name))
    broken["available_node_types"]["gpu_worker"]["max_wokers"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_installs_the_project_syncs_code_and_keeps_the_dashboard_local(name):
    cfg = load(name)
    setup = " ".join(cfg["setup_commands"])
    assert "ray[default,train,tune,data]" in setup  # ray[default]: the State API, PG cleanup
    assert "pip install -q -e ~/dssn" in setup
    assert cfg["file_mounts"]["~/dssn"] == "."
    assert "DSSN_STORAGE=" in setup  # shared storage for results
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_holds_no_credentials(name):
    text = (CLUSTER / name).read_text()
    forbidden = [
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"aws_secret_access_key",
        r"aws_access_key_id",
        r"BEGIN [A-Z ]*PRIVATE KEY",
        r"ssh_private_key",
        r"private_key_id",
    ]
    for pattern in forbidden:
        assert not re.search(pattern, text, re.IGNORECASE), pattern
