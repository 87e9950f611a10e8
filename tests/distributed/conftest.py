"""Fixtures of the tests that run the real launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import launcher


@pytest.fixture(scope="session")
def launch_cache(tmp_path_factory) -> Path:
    """One COORDEXP_CACHE for the session's launcher runs, the default tiny model and synthetic set in it."""
    return launcher.prepare_cache(tmp_path_factory.mktemp("launch_cache"))
