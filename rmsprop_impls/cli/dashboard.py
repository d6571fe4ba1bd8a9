"""``rmsprop-bench dashboard``: asv's regression dashboard, published, made offline-safe and served locally."""

from __future__ import annotations

import argparse

from ..analysis.dashboard import DashboardError, build_dashboard, dashboard_server, npm_cache_dir
from .common import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="publish asv's dashboard with its JavaScript vendored, and serve it on 127.0.0.1",
        description="Run 'asv publish', replace the CDN links in the dashboard (jQuery, flot, bootstrap, ...) with "
        f"copies from the npm registry (downloaded once per machine, cached under {npm_cache_dir()}), then "
        "serve it on 127.0.0.1 until Ctrl-C.",
    )
    p.add_argument("--config", default="asv.conf.json", help="asv configuration file (default asv.conf.json)")
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 to serve on (default 8080; 0: any free)")
    p.add_argument("--no-serve", action="store_true", help="only build the self-contained dashboard, do not serve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        html_dir = build_dashboard(args.config)
        print(f"dashboard built in {html_dir}/ (self-contained: opens offline)")
        if args.no_serve:
            return 0
        server = dashboard_server(html_dir, args.port)
    except (DashboardError, OSError) as e:
        raise UserError(str(e)) from None
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    with server:
        server.serve_forever()
    return 0
