"""Fixtures shared across test files, and how pytest-xdist shares the test files out."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from asv_project import AsvHistory, build_history
from built_once import built_once

#: The test files that read real asv histories, in two work units: the files of the shared four-commit history
#: (``asv_history``), and those of the richer ones (``analysis_history``, ``machines_history``; they read the
#: first too). Each history is built once (``built_once``), the two units building theirs side by side while
#: the other workers run the rest.
ASV_RESULT_UNITS = {
    **dict.fromkeys(["test_asv_history", "test_asv_suite", "test_dashboard", "test_dashboard_assets"], "asv-history"),
    **dict.fromkeys(["test_notebooks", "test_results", "test_tracking"], "asv-analyses"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The asv files first: the longest work units start at once (order within a file is kept)."""
    items.sort(key=lambda item: item.path.stem not in ASV_RESULT_UNITS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """A test file per work unit, as ``--dist loadfile`` (a module's fixtures are built once), but the files of
    asv results in the two units above."""
    from xdist.scheduler import LoadFileScheduling

    class FilesAndAsvResults(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return ASV_RESULT_UNITS.get(PurePosixPath(path).stem, path)

    return FilesAndAsvResults(config, log)


@pytest.fixture(scope="session")
def asv_history(tmp_path_factory) -> AsvHistory:
    """Real asv results over four commits of a throw-away copy of this project; the third slows ``eager``."""
    return built_once(tmp_path_factory, "asv-history", build_history)
