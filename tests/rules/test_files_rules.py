"""webui.files.RoutePolicy, case by case (its module docstring is the contract): a file route
serves a path only when its resolved real path lies in an allowed root (Gradio's upload and cache
folders, the example concepts) and not in the runs folder, the runs folder itself included;
Gradio's frontend routes pass; every other route with a path, and the unused ones, are refused."""

import os
import urllib.parse

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from webui import files


def served(request):
    return PlainTextResponse("served")


# the studio's route templates, and one path route no one has classified (as a new Gradio might add)
APP = Starlette(routes=[Route(t, served) for t in [*files.FILE_ROUTES, *files.FRONTEND_ROUTES, *files.REFUSED_ROUTES,
                                                   "/gradio_api/info", "/gradio_api/new-feature/{name:path}"]])


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """tmp_path, the server's folder, holding: Gradio's upload folder (named through a link, as
    /tmp is on some systems) and cache folder, the examples (an allowed root) with a runs folder
    inside it, prefix siblings of both, a folder outside every root, and links in and out."""
    for name in ("upload/u.png", "cache/c.png", "examples/e.png", "examples/sub/s.png", "examples/runs/run1/job.json",
                 "examples/runs2/r.png", "examples/runs-old/o.png", "examples2/x.png", "outside/secret.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    links = {"upload-link": "upload", "examples/out-link.txt": "outside/secret.txt", "examples/out-dir": "outside",
             "examples/into-runs.json": "examples/runs/run1/job.json", "examples/runs-folder": "examples/runs",
             "outside/in-link.png": "examples/e.png", "outside/into-runs.json": "examples/runs/run1/job.json",
             "runs-alias": "examples/runs"}
    for link, target in links.items():
        (tmp_path / link).symlink_to(tmp_path / target)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "upload-link"))
    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # Gradio resolves a relative path against the server's folder
    return tmp_path


def policy(tree, runs="examples/runs"):
    return files.RoutePolicy(None, private=tree / runs, allowed=[tree / "examples"])


def verdict(policy, path: str, method: str = "GET"):
    """The verdict on a request whose path the server decoded to `path` (uvicorn unquotes once)."""
    return policy.verdict({"type": "http", "path": path, "method": method, "app": APP})


SERVED = [
    "upload/u.png",  # an upload (the folder named through a link)
    "upload-link/u.png",
    "cache/c.png",  # a copy of what a handler returned
    "examples/e.png",
    "examples/sub/s.png",
    "examples/sub/../e.png",  # a detour that stays inside
    "examples/runs/../e.png",  # through the runs folder and out of it again
    "examples/runs2/r.png",  # a sibling of the runs folder whose name starts with its name
    "examples/runs-old/o.png",
    "outside/in-link.png",  # a link outside every root to a file inside one
    "examples",  # an allowed root itself
]
REFUSED = [
    "examples2/x.png",  # a sibling of an allowed root whose name starts with its name
    "outside/secret.txt",
    "examples/../outside/secret.txt",
    "examples/sub/../../outside/secret.txt",
    "examples/out-link.txt",  # a link inside an allowed root to a file outside
    "examples/out-dir/secret.txt",  # ... to a folder outside
    "examples/runs",  # the runs folder on its own, though it lies in an allowed root
    "examples/runs/",
    "examples/runs/.",
    "examples/runs/run1",
    "examples/runs/run1/job.json",
    "examples/runs2/../runs/run1/job.json",
    "examples/into-runs.json",  # a link inside an allowed root into the runs folder
    "examples/runs-folder",  # ... to the runs folder itself
    "examples/runs-folder/run1/job.json",
    "runs-alias/run1/job.json",  # the runs folder by another name
    "outside/into-runs.json",  # a link outside every root into the runs folder
    ".",  # the server's own folder
    "/etc/passwd",
]


@pytest.mark.parametrize("route", ["/gradio_api/file=", "/gradio_api/file/"])
@pytest.mark.parametrize("relative", SERVED)
def test_a_file_route_serves_what_lies_in_an_allowed_root(tree, route, relative):
    for spelled in (relative, str(tree / relative)):  # relative to the server's folder, and absolute
        assert verdict(policy(tree), route + spelled) is None, spelled


@pytest.mark.parametrize("route", ["/gradio_api/file=", "/gradio_api/file/"])
@pytest.mark.parametrize("relative", REFUSED)
def test_a_file_route_refuses_what_lies_outside_the_allowed_roots_or_in_the_runs_folder(tree, route, relative):
    for spelled in (relative, str(tree / relative) if not relative.startswith("/") else relative):
        assert verdict(policy(tree), route + spelled) == "not allowed", spelled


@pytest.mark.parametrize("runs", ["examples/runs", "runs-alias", "examples/runs-folder"])
def test_the_runs_folder_is_refused_however_the_studio_names_it(tree, runs, monkeypatch):
    """The runs folder given by a link or a relative path is the same folder."""
    for given in (tree / runs, runs):
        assert verdict(policy(tree, runs=given), "/gradio_api/file=examples/runs/run1/job.json") == "not allowed"
        assert verdict(policy(tree, runs=given), "/gradio_api/file=examples/runs") == "not allowed"
        assert verdict(policy(tree, runs=given), "/gradio_api/file=examples/runs2/r.png") is None


@pytest.mark.parametrize(("raw", "expected"), [
    ("examples%2Fe.png", None),
    ("examples/%65.png", None),
    ("examples%2F..%2Foutside%2Fsecret.txt", "not allowed"),
    ("examples/%2e%2e/outside/secret.txt", "not allowed"),
    ("examples%2Fruns%2Frun1%2Fjob.json", "not allowed"),
    ("examples%252Fe.png", "not allowed"),  # encoded twice: decoded once, a name that is no file of a root
    ("examples/runs%00/run1", "not a path"),
])
def test_encoded_paths_are_judged_as_the_server_decodes_them(tree, raw, expected):
    assert verdict(policy(tree), urllib.parse.unquote("/gradio_api/file=" + raw)) == expected


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x.png", "https://example.com/a.png", "HTTPS://example.com/a.png",
                                 "//example.com/a.png", "file:///etc/passwd", "http:example.com"])
def test_a_file_route_fetches_no_url(tree, url):
    assert verdict(policy(tree), "/gradio_api/file=" + url) == "URLs are not fetched"


@pytest.mark.parametrize(("path", "expected"), [
    ("/static/../../etc/passwd", None),  # Gradio's frontend routes join the path safely themselves
    ("/assets/index.js", None),
    ("/svelte/svelte.js", None),
    ("/gradio_api/new-feature/examples/e.png", "not served by this studio"),  # a path route no one classified
    ("/gradio_api/proxy=http://127.0.0.1:1/x", "not served by this studio"),
    ("/gradio_api/custom_component/a/b/c/d", "not served by this studio"),
    ("/gradio_api/stream/a/b/0/playlist-file", "not served by this studio"),
    ("/monitoring", "not served by this studio"),
    ("/monitoring/summary", "not served by this studio"),
    ("/gradio_api/dev/reload", "not served by this studio"),
    ("/gradio_api/info", None),  # a route that names no file
    ("/no/such/route", None),
])
def test_every_other_route_by_its_class(tree, path, expected):
    assert verdict(policy(tree), path) == expected


def test_the_middleware_answers_a_refusal_with_403_and_passes_the_rest(tree):
    app = Starlette(routes=APP.routes, middleware=files.middleware(tree / "examples" / "runs", [tree / "examples"]))
    client = TestClient(app)
    assert client.get("/gradio_api/file=" + urllib.parse.quote(str(tree / "examples/e.png"))).text == "served"
    refused = client.get("/gradio_api/file=" + urllib.parse.quote(str(tree / "examples/runs/run1/job.json")))
    assert refused.status_code == 403 and refused.text == "File not allowed: not allowed."
    assert client.get("/gradio_api/file=" + urllib.parse.quote(str(tree / "examples2/x.png"))).status_code == 403


def test_the_allowed_roots_are_gradios_folders_and_the_extra_ones_by_real_path(tree):
    assert files.allowed_roots([tree / "examples"]) == [tree / "upload", tree / "cache", tree / "examples"]
    assert files.allowed_roots([os.path.join("examples", "sub", "..")])[-1] == tree / "examples"
