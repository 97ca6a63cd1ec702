"""What the studio's web server serves from the file system, and how much a client may upload.

Gradio serves files through several routes (`/gradio_api/file=<path>`, its deprecated twin
`/gradio_api/file/<path>`, its frontend's `/assets`, `/static`, `/svelte`, and others it does
not need: a reverse proxy to other Spaces, custom components' templates, finished media
streams). `launch(allowed_paths=...)` must include the runs folder so that Gradio may copy what a
handler returns (a sample, a tuner, a picture) into its cache; every file the UI hands out is
such a copy, fetched under a URL derived from its content. So nothing is ever served from the
runs folder itself, and `RoutePolicy` enforces one rule for every route of the app, found by
matching the request against the app's own route table:

- a file route serves a path only when its resolved real path lies in an allowed root: Gradio's
  upload/cache folder, the example concepts, and never the runs folder (nor a URL: the route
  would fetch it from the server, and the studio hands out none);
- Gradio's frontend routes serve its package's own files (Gradio joins the path safely);
- every other route with a path parameter is refused, so a route a new Gradio adds that reads
  files by path is refused until it is classified here (tests/security/test_routes.py lists the
  app's routes and fails on one that is not).

`UploadQuota` bounds what one client (by address) and all clients together may send per hour
in request bodies, to every route (the upload route's files, a recording, an API call's JSON;
trainers.service.limits: RESTUNING_UPLOAD_MB_PER_CLIENT / _TOTAL); Gradio's `max_file_size` bounds each
uploaded file.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

from gradio import utils as gradio_utils
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import compile_path

FILE_ROUTES = {"/gradio_api/file={path_or_url:path}": "path_or_url", "/gradio_api/file/{path:path}": "path"}
FRONTEND_ROUTES = {"/svelte/{path:path}", "/static/{path:path}", "/assets/{path:path}"}
# Routes the studio does not use, refused: Gradio's reverse proxy to other apps, custom
# components' templates, finished media streams (paths), its usage monitoring (the handlers' names
# and request counts) and the reload stream of its development mode (an answer that never ends).
REFUSED_ROUTES = {"/gradio_api/proxy={url_path:path}",
                  "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}",
                  "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file",
                  "/monitoring", "/monitoring/summary", "/monitoring/{key}", "/gradio_api/dev/reload"}


def app_routes(routes) -> list:
    """Every route of a FastAPI/Starlette app, routers included by reference flattened."""
    out = []
    for route in routes:
        if hasattr(route, "effective_candidates"):  # fastapi's lazily included router
            out.extend(app_routes(route.effective_candidates()))
        elif hasattr(route, "routes") and not hasattr(route, "path_format"):
            out.extend(app_routes(route.routes))
        else:
            out.append(route)
    return out


def takes_a_path(route) -> bool:
    """A route whose URL carries a path (a `{...:path}` parameter): what could name a file."""
    return ":path}" in getattr(route, "path", "")


def allowed_roots(extra=()) -> list[Path]:
    """Where a file route may serve from: Gradio's upload/cache folder (uploads and the copies
    of what handlers return), its examples cache, and `extra` (the example concepts)."""
    roots = [gradio_utils.get_upload_folder(), gradio_utils.get_cache_folder(), *extra]
    return [Path(os.path.realpath(gradio_utils.abspath(r))) for r in roots]


def inside(path: Path, roots: list[Path]) -> bool:
    """`path` (a real path: links resolved) is one of `roots` or lies under one."""
    return any(path == root or path.is_relative_to(root) for root in roots)


class RoutePolicy:
    """ASGI middleware: the file-serving rule above, for every route of the app."""

    def __init__(self, app, private: str | Path, allowed=()):
        self.app = app
        self.private = Path(os.path.realpath(private))
        self.extra = tuple(allowed)
        self._table = None

    def _route_table(self, scope) -> list:
        if self._table is None:
            routes = app_routes(scope["app"].routes)
            self._table = [(route.path, compile_path(route.path)[0], getattr(route, "methods", None) or set())
                           for route in routes if takes_a_path(route) or route.path in REFUSED_ROUTES]
        return self._table

    def verdict(self, scope) -> str | None:
        """None to pass the request on, else the reason it is refused."""
        path, method = scope.get("path", ""), scope.get("method", "GET")
        for template, regex, methods in self._route_table(scope):
            match = regex.match(path)
            if not match or (methods and method not in methods):
                continue
            if template in FILE_ROUTES:
                return self._file_verdict(match.group(FILE_ROUTES[template]))
            if template in FRONTEND_ROUTES:
                return None
            return "not served by this studio"
        return None

    def _file_verdict(self, target: str) -> str | None:
        if "://" in target or target.startswith(("http:", "https:", "//")):
            return "URLs are not fetched"
        try:
            real = Path(os.path.realpath(gradio_utils.abspath(target)))
        except (OSError, ValueError):  # not a path at all (a NUL byte)
            return "not a path"
        if inside(real, [self.private]) or not inside(real, allowed_roots(self.extra)):
            return "not allowed"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            why = self.verdict(scope)
            if why is not None:
                # the answer Gradio gives a path it does not serve, whatever the reason
                await PlainTextResponse(f"File not allowed: {why}.", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


WINDOW_SECONDS = 3600.0
PROXY_HOPS_ENV = "RESTUNING_PROXY_HOPS"


def client_address(scope, hops: int) -> str:
    """The client's address: with `hops` trusted proxies in front (a Space's is one), the
    address the outermost of them put into X-Forwarded-For (what a client writes there itself
    comes before it and is not trusted; several X-Forwarded-For lines are one list, in order);
    else the connection's peer."""
    if hops > 0:
        entries = [e.strip() for name, value in scope.get("headers", []) if name == b"x-forwarded-for"
                   for e in value.decode("latin-1").split(",") if e.strip()]
        if len(entries) >= hops:
            return entries[-hops]
    client = scope.get("client")
    return client[0] if client else "?"


def trust_no_forwarding(env=None) -> None:
    """Make the web server take a connection's address as it is. Uvicorn, which Gradio's launch()
    starts, replaces it by what X-Forwarded-For says whenever the connection comes from the
    loopback address (its FORWARDED_ALLOW_IPS, read when launch() makes the server; launch() has
    no parameter for it), so a program on the machine, or a proxy that passes the header on,
    could name any address for the quota. Which proxies name the client is `--proxy-hops` alone
    (client_address)."""
    env = os.environ if env is None else env
    env["FORWARDED_ALLOW_IPS"] = ""


def declared_body(scope) -> int | None:
    """The bytes of a request's body as its headers declare them: 0 without Content-Length and
    Transfer-Encoding (HTTP/1.1 then reads no body), None for a body of undeclared length
    (chunked) or a malformed or contradictory Content-Length."""
    lengths = [value.strip() for name, value in scope.get("headers", []) if name == b"content-length"]
    if any(name == b"transfer-encoding" for name, _ in scope.get("headers", [])):
        return None
    if not lengths:
        return 0
    if len(set(lengths)) != 1 or not lengths[0].isdigit():
        return None
    return int(lengths[0])


class UploadQuota:
    """ASGI middleware: bytes sent in request bodies, to any route, per client and in all, over a
    sliding hour; a request over either is refused (429) before its body is read. The size is
    the request's Content-Length (a body without one is refused, 411): the server reads no more."""

    def __init__(self, app, per_client: int | None, total: int | None, hops: int = 0, clock=time.monotonic):
        self.app, self.per_client, self.total, self.hops, self.clock = app, per_client, total, hops, clock
        self._sent: collections.deque[tuple[float, str, int]] = collections.deque()
        self._lock = threading.Lock()

    def charge(self, client: str, size: int) -> str | None:
        """Count `size` bytes against `client`'s and the total quota; the refusal message if over."""
        now = self.clock()
        with self._lock:
            while self._sent and now - self._sent[0][0] > WINDOW_SECONDS:
                self._sent.popleft()
            mine = sum(n for _, who, n in self._sent if who == client)
            everyone = sum(n for _, _, n in self._sent)
            if self.per_client is not None and mine + size > self.per_client:
                return f"this address has uploaded {mine / 2**20:.0f} MB in the last hour, its limit is {self.per_client / 2**20:.0f} MB"
            if self.total is not None and everyone + size > self.total:
                return "the studio has taken all the uploads it takes in an hour; try again later"
            self._sent.append((now, client, size))
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = declared_body(scope)
            if size is None:
                await PlainTextResponse("Length required.", status_code=411)(scope, receive, send)
                return
            why = self.charge(client_address(scope, self.hops), size) if size else None
            if why is not None:
                await PlainTextResponse(f"Upload refused: {why}.", status_code=429)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def middleware(runs_dir: str | Path, allowed=(), limits=None, hops: int = 0) -> list[Middleware]:
    """The studio's middleware: RoutePolicy always, UploadQuota when `limits` bound uploads."""
    out = [Middleware(RoutePolicy, private=runs_dir, allowed=allowed)]
    if limits is not None and (limits.upload_per_client is not None or limits.upload_total is not None):
        out.append(Middleware(UploadQuota, per_client=limits.upload_per_client, total=limits.upload_total, hops=hops))
    return out
