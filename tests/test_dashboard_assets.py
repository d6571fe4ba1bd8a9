"""Vendoring the dashboard's assets fails loudly and clearly: unknown links, wrong files, no registry, no CAs."""

from __future__ import annotations

import functools
import http.server
import io
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
import urllib.error
from pathlib import Path

import asv
import pytest

from rmsprop_impls.analysis import dashboard
from rmsprop_impls.analysis.dashboard import (
    NPM_INTEGRITY,
    DashboardError,
    localise,
    npm_file_bytes,
    npm_file_for,
    npm_tarball,
    tarball_integrity,
)

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
    env = {
        **os.environ,
        "RMSPROP_BENCH_CACHE_DIR": str(tmp_path / "cache"),
        "npm_config_registry": "http://127.0.0.1:9",
    }
    code = "import sys; from rmsprop_impls.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", code, "dashboard", "--no-serve", "--config", str(repo / "asv.conf.json")]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "cannot download http://127.0.0.1:9/jquery/-/jquery-3.3.1.tgz" in out.stderr


@pytest.fixture
def empty_cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("RMSPROP_BENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "npm"


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A local npm registry serving ``tmp_path/registry``: (its folder, a function that publishes a tarball)."""
    folder = tmp_path / "registry"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{server.server_address[1]}")

    def publish(package: str, version: str, content: bytes) -> Path:
        path = folder / package / "-" / f"{package}-{version}.tgz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    yield publish
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


def _tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_every_file_asvs_dashboard_loads_has_a_pinned_sha512():
    index = (Path(asv.__file__).parent / "www" / "index.html").read_text()
    urls = [m[1] for m in dashboard._EXTERNAL_TAG.finditer(index) if m[1].endswith((".js", ".css"))]
    assert len(urls) >= 8
    for url in urls:
        file = npm_file_for(url)
        assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", NPM_INTEGRITY[file.package, file.version]), url


def test_a_package_without_a_pin_is_refused_before_any_download(empty_cache):
    with pytest.raises(DashboardError, match="no sha512 pinned for npm package left-pad@1.3.0"):
        npm_tarball("left-pad", "1.3.0")
    assert not empty_cache.exists()


def test_a_tampered_cached_tarball_is_refused_and_removed(empty_cache):
    cached = empty_cache / "jquery-3.3.1.tgz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(_tarball({"dist/jquery.min.js": b"alert('not jquery')"}))
    with pytest.raises(DashboardError, match=r"the cached jquery@3\.3\.1 .* is not the tarball npm published"):
        npm_tarball("jquery", "3.3.1")
    assert not cached.exists()


def test_a_download_that_is_not_npms_tarball_is_refused_and_not_cached(empty_cache, registry):
    registry("jquery", "3.3.1", _tarball({"dist/jquery.min.js": b"alert('from a bad mirror')"}))
    with pytest.raises(DashboardError, match="the download from http://127.0.0.1:.* is not the tarball npm published"):
        npm_tarball("jquery", "3.3.1")
    assert list(empty_cache.iterdir()) == []


def test_a_download_that_matches_its_pin_is_cached_and_checked_again_on_use(empty_cache, registry, monkeypatch):
    published = registry("tiny-lib", "1.0.0", _tarball({"tiny.js": b"var tiny = 1;"}))
    monkeypatch.setitem(NPM_INTEGRITY, ("tiny-lib", "1.0.0"), tarball_integrity(published))
    path = npm_tarball("tiny-lib", "1.0.0")
    assert path == empty_cache / "tiny-lib-1.0.0.tgz" and path.read_bytes() == published.read_bytes()
    published.unlink()  # the second use reads the cache only
    assert npm_tarball("tiny-lib", "1.0.0") == path


def test_a_certificate_failure_is_named_with_its_fix(empty_cache, monkeypatch):
    def refuse(url, timeout, context):
        assert isinstance(context, ssl.SSLContext)
        raise urllib.error.URLError(ssl.SSLCertVerificationError(1, "unable to get local issuer certificate"))

    monkeypatch.setattr(dashboard.urllib.request, "urlopen", refuse)
    with pytest.raises(DashboardError) as e:
        npm_tarball("jquery", "3.3.1")
    assert "TLS connection failed" in str(e.value) and "certifi" in str(e.value) and "offline" not in str(e.value)


def test_certifis_bundle_is_added_to_the_systems_where_installed():
    certifi = pytest.importorskip("certifi")
    system = ssl.create_default_context().get_ca_certs()
    bundle = ssl.create_default_context(cafile=certifi.where()).get_ca_certs()
    used = dashboard._ssl_context().get_ca_certs()
    assert all(cert in used for cert in system + bundle)


@pytest.mark.parametrize("name", ["chromium", "chromium-browser", "google-chrome"])
def test_the_browser_test_finds_chromium_under_each_usual_name(monkeypatch, tmp_path, name):
    from test_dashboard import find_chromium

    (tmp_path / name).write_text("#!/bin/sh\n")
    (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium(bundles=[]) == str(tmp_path / name)


def test_the_browser_test_finds_a_macos_app_bundle_and_otherwise_nothing(monkeypatch, tmp_path):
    from test_dashboard import find_chromium

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    bundle = tmp_path / "Google Chrome.app" / "Contents" / "MacOS" / "Google Chrome"
    assert find_chromium(bundles=[str(bundle)]) is None
    bundle.parent.mkdir(parents=True)
    bundle.write_text("")
    assert find_chromium(bundles=[str(bundle)]) == str(bundle)
