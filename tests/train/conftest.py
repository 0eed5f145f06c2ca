"""Fixtures of the training tests: a small synthetic corpus (made once per session)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from mm.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), n=48, n_val=20)
