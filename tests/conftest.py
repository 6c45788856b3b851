"""Shared fixtures: the parity fixture path and one local Ray instance for the whole run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def parity_path() -> Path:
    # prefer the shared copy beside the checkout (the source of truth), else the vendored copy
    shared = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dssn_official_parity.pt"
    return shared if shared.is_file() else FIXTURES / "dssn_official_parity.pt"


@pytest.fixture(scope="session")
def ray_instance():
    """One real local Ray instance shared by every integration test of the session."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Logical CPUs above the 2 physical cores: train workers take fractions, and Ray Data
    # needs CPUs left free for its read/augment tasks or it waits forever.
    # (the dashboard on a known port, named in RAY_API_SERVER_ADDRESS: with other Ray
    # instances on the machine, Train's placement-group cleaner would otherwise ask the wrong one)
    from dssn.train.launcher import start_local_ray

    start_local_ray(4, log_to_driver=True)
    yield ray
    ray.shutdown()


# tiny digits: enough rows for 2 workers x batch 2 x a few iterations, seconds to generate
TINY_DIGITS = {"n_train": 48, "n_val": 12, "labeled_fraction": 0.25, "seed": 0, "shard_rows": 16}


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> Path:
    """Tiny digit-scene shards (labeled/unlabeled/val + dataset.json), generated once."""
    from dssn.data.digits import generate

    root = tmp_path_factory.mktemp("tiny-digits") / "shards"
    generate(root, workers=1, **TINY_DIGITS)
    return root
