"""Vendoring the dashboard's assets fails loudly and clearly: unknown links, wrong files, no registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from rmsprop_impls.analysis.dashboard import DashboardError, localise, npm_file_bytes, npm_file_for

JQUERY = "https://code.jquery.com/jquery-3.3.1.min.js"


def test_a_cdn_link_we_do_not_know_is_named(tmp_path):
    (tmp_path / "index.html").write_text('<script src="https://cdn.example.com/new-lib.min.js"></script>')
    with pytest.raises(DashboardError, match="loads https://cdn.example.com/new-lib.min.js, which"):
        localise(tmp_path)


def test_a_file_that_does_not_match_asvs_integrity_is_refused(tmp_path):
    try:
        npm_file_bytes(npm_file_for(JQUERY))
    except DashboardError as e:
        pytest.skip(f"the npm registry is out of reach and the asset cache is empty: {e}")
    wrong = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    (tmp_path / "index.html").write_text(f'<script src="{JQUERY}" integrity="{wrong}"></script>')
    with pytest.raises(DashboardError, match="does not match the integrity asv pins"):
        localise(tmp_path)


def test_an_unreachable_registry_is_one_line_and_exit_2(asv_history, tmp_path):
    repo = shutil.copytree(asv_history.repo, tmp_path / "repo", symlinks=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "npm_config_registry": "http://127.0.0.1:9"}
    code = "import sys; from rmsprop_impls.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", code, "dashboard", "--no-serve", "--config", str(repo / "asv.conf.json")]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "cannot download http://127.0.0.1:9/jquery/-/jquery-3.3.1.tgz" in out.stderr
