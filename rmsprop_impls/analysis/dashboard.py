"""asv's dashboard, made to work offline: publish, vendor the CDN assets, serve on 127.0.0.1.

``asv publish`` (0.6.6) writes an ``index.html`` that loads jQuery, flot and
its plugins, stupidtable, blueimp-md5 and bootstrap from three CDNs; offline
it shows "external (JavaScript) dependencies failed to load". Every one of
those files is published on the npm registry, so we fetch the package
tarballs once per machine (cached under the user cache directory), copy the
files next to the dashboard, point the tags at them and drop the
``integrity``/``crossorigin`` attributes.

Whatever ends up in the page is checked first: every tarball against the
sha512 npm publishes for it (``dist.integrity``, pinned in
:data:`NPM_INTEGRITY`), after each download and each time a cached copy is
used, so a tampered mirror or cache cannot put script into the dashboard; and
where the npm file is the very file the CDN serves, against asv's own
``integrity`` too.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from asv.config import Config

from ..user_cache import cache_dir as user_cache_dir

#: Where npm's own client fetches from, unless ``npm_config_registry`` says otherwise.
NPM_REGISTRY = "https://registry.npmjs.org"
VENDOR_DIR = "vendor"


class DashboardError(Exception):
    """Publishing or localising failed; the message is one line that says what and where."""


@dataclass(frozen=True)
class NpmFile:
    """A file inside an npm package; ``same_file`` when it is byte-for-byte what the CDN serves."""

    package: str
    version: str
    path: str
    same_file: bool = True

    @property
    def local_path(self) -> str:
        return f"{VENDOR_DIR}/{self.package}@{self.version}/{self.path}"


#: npm's ``dist.integrity`` of every tarball the dashboard uses (``npm view <package>@<version> dist.integrity``).
NPM_INTEGRITY = {
    ("jquery", "3.3.1"): (
        "sha512-Ubldcmxp5np52/ENotGxlLe6aGMvmF4R8S6tZjsP6Knsaxd/xp3Zrh50cG93lR6nPXyUFwzN3ZSOQI0wRJNdGg=="
    ),
    ("flot", "0.8.3"): (
        "sha512-xg2otcTJDvS+ERK+my4wxG/ASq90QURXtoM4LhacCq0jQW2jbyjdttbRNqU2cPykrpMvJ6b2uSp6SAgYAzj9tQ=="
    ),
    ("stupid-table-plugin", "1.1.3"): (
        "sha512-2Vk7XouQPxUQPRe9w0Fu7ZZ8kHLK7rDoLMsCgtKxRNJ7f4dSOGvW9CkHsq5wD6QsaEnWoyLBYH3xOEsrK3yWBg=="
    ),
    ("blueimp-md5", "2.19.0"): (
        "sha512-DRQrD6gJyy8FbiE4s+bDoXS9hiW3Vbx5uCdwvcCf3zLHL+Iv7LtGHLpr+GZV8rHG8tK766FGYBwRbu8pELTt+w=="
    ),
    ("bootstrap", "3.1.1"): (
        "sha512-TAzqS8E/ISpVHP29gYhy+1NSV+FJwApDVQhDfgLYsIuUDJiqJzH2DfORN5tiu+Ie2iBLrzEG34t4Rf465cigqg=="
    ),
    ("flot-orderbars", "1.0.0"): (
        "sha512-Jv51fvzevUjNXEeozpwEKfPjhiZhfiJddv0WHjduUTCmSF+7T5K7C9c9Y1wIVmUhDBv5fLMjgbwKecT0GIKPZA=="
    ),
}

#: The CDN files asv 0.6.6 loads that are not under jsdelivr's npm mirror, and their npm equivalents.
#: flot 0.8.3 on npm ships the unminified build of the same release; npm has no stupidtable 1.0.1, so its
#: successor 1.1.3 (same ``$.fn.stupidtable`` API) stands in.
CDN_FILES = {
    "https://code.jquery.com/jquery-3.3.1.min.js": NpmFile("jquery", "3.3.1", "dist/jquery.min.js"),
    **{
        f"https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot{part}.min.js": NpmFile(
            "flot", "0.8.3", f"jquery.flot{part}.js", same_file=False
        )
        for part in ("", ".time", ".selection", ".categories")
    },
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": NpmFile(
        "stupid-table-plugin", "1.1.3", "stupidtable.min.js", same_file=False
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": NpmFile(
        "blueimp-md5", "2.19.0", "js/md5.min.js"
    ),
}

_JSDELIVR_NPM = re.compile(r"^https://cdn\.jsdelivr\.net/npm/(?P<package>[^@/]+)@(?P<version>[^/]+)/(?P<path>.+)$")
#: ``<script src=...>`` and ``<link href=...>`` tags that load from an absolute http(s) URL.
_EXTERNAL_TAG = re.compile(r"<(?:script|link)\b[^>]*?\b(?:src|href)=\"(https?://[^\"]+)\"[^>]*>", re.IGNORECASE)
_DROPPED_ATTRIBUTES = re.compile(r"\s+(?:integrity|crossorigin|referrerpolicy)=\"[^\"]*\"", re.IGNORECASE)
_INTEGRITY = re.compile(r"\bintegrity=\"(sha\d+)-([^\"]+)\"")


def npm_file_for(url: str) -> NpmFile:
    """The npm package file that stands in for a CDN ``url``; raises for one we do not know."""
    if url in CDN_FILES:
        return CDN_FILES[url]
    m = _JSDELIVR_NPM.match(url)
    if m:
        return NpmFile(m["package"], m["version"], m["path"])
    raise DashboardError(f"asv's dashboard loads {url}, which rmsprop_impls.dashboard.CDN_FILES does not map to npm")


def npm_cache_dir() -> Path:
    """Where downloaded npm tarballs are kept, once per machine: ``npm/`` in the user cache."""
    return user_cache_dir() / "npm"


def tarball_integrity(path: Path) -> str:
    """``sha512-<base64>``, the form npm publishes as ``dist.integrity``."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _pinned_integrity(package: str, version: str) -> str:
    pinned = NPM_INTEGRITY.get((package, version))
    if pinned is None:
        raise DashboardError(
            f"no sha512 pinned for npm package {package}@{version}; add its 'npm view {package}@{version} "
            "dist.integrity' to rmsprop_impls.analysis.dashboard.NPM_INTEGRITY"
        )
    return pinned


def _verify_tarball(path: Path, package: str, version: str, source: str) -> None:
    """Fail, and remove ``path``, unless it is the tarball npm published."""
    found, pinned = tarball_integrity(path), _pinned_integrity(package, version)
    if found != pinned:
        path.unlink(missing_ok=True)
        raise DashboardError(
            f"{source} {package}@{version} ({path}) is not the tarball npm published: its sha512 is {found}, "
            f"npm's is {pinned}; the file was removed, try again (from another registry or network if it recurs)"
        )


def _ssl_context() -> ssl.SSLContext:
    """The system's CA certificates plus certifi's bundle where installed.

    python.org's macOS Python ships without CA certificates, so certifi supplies them there; the system's
    stay, for a proxy that re-signs TLS with a CA of its own (and ``SSL_CERT_FILE`` still works).
    """
    context = ssl.create_default_context()
    try:
        import certifi
    except ImportError:
        return context
    context.load_verify_locations(cafile=certifi.where())
    return context


def _download_error(url: str, e: Exception) -> DashboardError:
    reason = getattr(e, "reason", e)
    if isinstance(reason, ssl.SSLError):
        return DashboardError(
            f"cannot download {url}: the TLS connection failed ({reason}); the server's certificate is not signed "
            "by a CA this Python trusts (the system's, and certifi's where installed): pip install certifi, or run "
            "python.org's 'Install Certificates.command', or set SSL_CERT_FILE to your (proxy's) CA bundle"
        )
    return DashboardError(f"cannot download {url} ({e}); offline, copy {npm_cache_dir()} from a machine that has it")


def npm_tarball(package: str, version: str) -> Path:
    """The package's tarball from the npm registry, downloaded once per machine into ``npm_cache_dir()``.

    Checked against :data:`NPM_INTEGRITY` after the download and on every later use.
    """
    _pinned_integrity(package, version)
    target = npm_cache_dir() / f"{package}-{version}.tgz"
    if target.exists():
        _verify_tarball(target, package, version, "the cached")
        return target
    registry = os.environ.get("npm_config_registry", NPM_REGISTRY).rstrip("/")
    url = f"{registry}/{package}/-/{package}-{version}.tgz"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60, context=_ssl_context()) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError) as e:  # ssl.SSLError is an OSError
        raise _download_error(url, e) from None
    _verify_tarball(partial, package, version, f"the download from {registry} of")
    partial.replace(target)
    return target


@functools.cache
def _package_files(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball) as tar:
        return {
            m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and "/" in m.name
        }


def npm_file_bytes(file: NpmFile) -> bytes:
    files = _package_files(npm_tarball(file.package, file.version))
    if file.path not in files:
        raise DashboardError(f"npm package {file.package}@{file.version} has no file {file.path}")
    return files[file.path]


def _check_integrity(tag: str, content: bytes, file: NpmFile, url: str) -> None:
    """Where the npm file is the CDN's own, it must match the hash asv pinned."""
    m = _INTEGRITY.search(tag)
    if not (m and file.same_file):
        return
    digest = base64.b64encode(hashlib.new(m[1], content).digest()).decode()
    if digest != m[2]:
        raise DashboardError(
            f"{file.package}@{file.version}/{file.path} does not match the integrity asv pins for {url}; "
            f"delete {npm_cache_dir()} and try again"
        )


def localise(html_dir: str | Path) -> list[str]:
    """Make a published dashboard self-contained; returns the CDN URLs it replaced."""
    html_dir = Path(html_dir)
    index = html_dir / "index.html"
    if not index.exists():
        raise DashboardError(f"no published dashboard at {html_dir} (index.html is missing)")
    replaced: list[str] = []

    def vendor(m: re.Match) -> str:
        tag, url = m[0], m[1]
        if "<link" in tag.lower() and "stylesheet" not in tag.lower():
            return tag  # a feed or icon link, not something the page needs to load
        file = npm_file_for(url)
        content = npm_file_bytes(file)
        _check_integrity(tag, content, file, url)
        (html_dir / file.local_path).parent.mkdir(parents=True, exist_ok=True)
        (html_dir / file.local_path).write_bytes(content)
        replaced.append(url)
        return _DROPPED_ATTRIBUTES.sub("", tag.replace(url, file.local_path))

    index.write_text(_EXTERNAL_TAG.sub(vendor, index.read_text()))
    return replaced


def publish(config: str | Path) -> Path:
    """Run ``asv publish`` for ``config`` (an ``asv.conf.json``); returns the html directory it wrote."""
    config = Path(config).resolve()
    try:
        html_dir = config.parent / Config.load(str(config)).html_dir
    except Exception as e:  # asv raises its own UserError or a JSON error, one line each
        raise DashboardError(f"cannot read asv config {config}: {e}") from None
    done = subprocess.run(
        [sys.executable, "-m", "asv", "publish", "--config", str(config)],
        cwd=config.parent,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise DashboardError(f"asv publish failed for {config}: {last}")
    return html_dir


def build_dashboard(config: str | Path) -> Path:
    """Publish and localise; returns the html directory, ready to open offline."""
    html_dir = publish(config)
    localise(html_dir)
    return html_dir


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


class _DashboardServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A browser that navigates away drops its other requests; that is no error worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def dashboard_server(html_dir: str | Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``html_dir`` on 127.0.0.1 (``port`` 0 picks a free one); call ``serve_forever``."""
    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    return _DashboardServer(("127.0.0.1", port), handler)
