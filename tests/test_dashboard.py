"""The published dashboard works offline, checked in a real headless Chromium or Chrome.

Chromium runs with every host but 127.0.0.1 unresolvable, so a page can only
pass by loading what we vendored. Screenshots are kept in the pytest tmp dir
and copied to ``report/test-artifacts/`` (git-ignored) for CI to upload.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import asv
import pytest
from test_cli import cli

from rmsprop_impls.analysis.dashboard import dashboard_server

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "report" / "test-artifacts"
DEPENDENCY_ERROR = "dependencies of airspeed velocity failed to load"
#: Linux distributions' names on PATH, then the macOS app bundles.
BROWSER_NAMES = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
BROWSER_BUNDLES = [
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
]


def find_chromium(names=BROWSER_NAMES, bundles=BROWSER_BUNDLES) -> str | None:
    """A Chromium or Chrome to drive headless: the first of ``names`` on PATH, else an installed macOS app."""
    found = next(filter(None, map(shutil.which, names)), None)
    return found or next((b for b in bundles if Path(b).is_file()), None)


CHROMIUM = find_chromium()

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason=f"no Chromium or Chrome: none of {', '.join(BROWSER_NAMES)} is on PATH and no macOS app is in "
    "/Applications (Debian: apt-get install chromium, which .ci/run does; macOS: brew install --cask chromium)",
)


def chromium(url: str, profile: Path, *extra: str) -> str:
    """The DOM of ``url`` after its scripts ran (or what ``extra`` asks for), in an offline headless Chromium."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    offline = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
    command = [
        CHROMIUM,
        *flags,
        f"--user-data-dir={profile}",
        offline,
        "--virtual-time-budget=10000",
        *(extra or ["--dump-dom"]),
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def screenshot(url: str, profile: Path, path: Path) -> Path:
    chromium(url, profile, f"--screenshot={path}", "--window-size=1280,900")
    assert path.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    return path


def serve(html_dir: Path):
    server = dashboard_server(html_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def site(asv_history):
    """The shared history's dashboard built by ``rmsprop-bench dashboard --no-serve``, served: (URL, html dir)."""
    out = cli("dashboard", "--no-serve", "--config", str(asv_history.repo / "asv.conf.json"))
    if out.returncode == 2 and "cannot download" in out.stderr:
        pytest.skip(f"the npm registry is out of reach and the asset cache is empty: {out.stderr.strip()}")
    assert out.returncode == 0 and "self-contained" in out.stdout, out.stderr
    server = serve(asv_history.html_dir)
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html", asv_history.html_dir
    server.shutdown()


@pytest.fixture
def profile(tmp_path) -> Path:
    return tmp_path / "chromium-profile"


def test_asvs_own_page_fails_offline(site, profile, tmp_path):
    """The control: with the CDN links left in, the same offline browser shows asv's error page."""
    raw = shutil.copytree(site[1], tmp_path / "raw")
    shutil.copy(Path(asv.__file__).parent / "www" / "index.html", raw / "index.html")
    server = serve(raw)
    try:
        assert DEPENDENCY_ERROR in chromium(f"http://127.0.0.1:{server.server_address[1]}/index.html", profile)
    finally:
        server.shutdown()


def test_localised_page_loads_with_no_dependency_error(site, profile, tmp_path):
    index = (site[1] / "index.html").read_text()
    assert "integrity=" not in index and "https://cdn" not in index and "code.jquery.com" not in index
    dom = chromium(site[0], profile)
    assert DEPENDENCY_ERROR not in dom and "Benchmark grid" in dom and "bench_step.Step.time_step" in dom
    screenshot(site[0], profile, tmp_path / "dashboard-grid.png")


def test_graph_page_shows_more_than_one_variant(site, profile, tmp_path):
    url = f"{site[0]}#bench_step.Step.time_step"
    dom = chromium(url, profile)
    assert DEPENDENCY_ERROR not in dom and 'class="flot-base"' in dom
    assert 'class="legendLabel">variant-eager<' in dom and 'class="legendLabel">variant-flat<' in dom
    assert ">optimizer<" in dom and ">rmsprop<" in dom  # the parameter's selector, as asv draws one per parameter
    screenshot(url, profile, tmp_path / "dashboard-graph.png")


def test_regressions_page_lists_the_planted_regression(site, profile, tmp_path, asv_history):
    url = f"{site[0]}#/regressions"
    dom = chromium(url, profile)
    assert DEPENDENCY_ERROR not in dom
    rows = [r for r in dom.split("<tr") if "('eager', '4x1K', 'float32', 'rmsprop')" in r]
    assert any(asv_history.slowed[:8] in r for r in rows), rows
    screenshot(url, profile, tmp_path / "dashboard-regressions.png")


def test_dashboard_command_serves_on_localhost(site, asv_history):
    """Last in this module: it publishes again into the directory ``site`` serves (and skips where ``site`` does)."""
    code = "import sys; from rmsprop_impls.cli import main; sys.exit(main())"
    config = str(asv_history.repo / "asv.conf.json")
    command = [sys.executable, "-c", code, "dashboard", "--port", "0", "--config", config]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as served:
        try:
            lines = [served.stdout.readline(), served.stdout.readline()]
            url = re.search(r"http://127\.0\.0\.1:\d+/", lines[1])[0]
            with urllib.request.urlopen(url + "index.html", timeout=30) as page:
                assert "vendor/jquery@3.3.1/dist/jquery.min.js" in page.read().decode()
        finally:
            served.terminate()
