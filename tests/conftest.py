"""Fixtures shared across test files."""

from __future__ import annotations

import pytest
from asv_project import AsvHistory, build_history


@pytest.fixture(scope="session")
def asv_history(tmp_path_factory) -> AsvHistory:
    """Real asv results over four commits of a throw-away copy of this project; the third slows ``eager``."""
    return build_history(tmp_path_factory.mktemp("asv-history"))
