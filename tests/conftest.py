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
    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=True)
    yield ray
    ray.shutdown()
