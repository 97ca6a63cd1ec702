"""Issue 26, item 1: every route Gradio has that serves files goes through one allow-list by
resolved real path (webui.files.RoutePolicy); a route Gradio adds later fails
`test_every_route_of_the_app_is_classified` until it is; and the page holds no secret."""

import http.client
import json
import os
import urllib.parse
from pathlib import Path

import webui
from tests.test_jobs import wait_for
from webui import files, visitors

# Every route of the studio's app under Gradio 6.31, by what it may serve. A new one fails the
# test below: classify it (and, if it reads files by path, teach webui.files how to check it).
NO_FILES = {
    "/openapi.json", "/login/", "/login", "/logout", "/", "/gradio_api/deep_link", "/config", "/config/",
    "/favicon.ico", "/theme.css", "/robots.txt", "/pwa_icon/{size}", "/pwa_icon", "/manifest.json",
    "/gradio_api/user/", "/gradio_api/user", "/gradio_api/login_check/",
    "/gradio_api/login_check", "/gradio_api/token/", "/gradio_api/token", "/gradio_api/app_id/", "/gradio_api/app_id",
    "/gradio_api/runs/", "/gradio_api/runs", "/gradio_api/run-history/connect",
    "/gradio_api/run-history/buckets", "/gradio_api/run-history/records",
    "/gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}", "/gradio_api/info", "/gradio_api/info/",
    "/gradio_api/openapi.json", "/gradio_api/stream/{event_id}", "/gradio_api/stream/{event_id}/close",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}", "/gradio_api/reset",
    "/gradio_api/reset/", "/gradio_api/heartbeat/{session_hash}", "/gradio_api/api/{api_name}/",
    "/gradio_api/api/{api_name}", "/gradio_api/run/{api_name}/", "/gradio_api/run/{api_name}",
    "/gradio_api/call/v2/{api_name}/", "/gradio_api/call/v2/{api_name}", "/gradio_api/call/{api_name}/",
    "/gradio_api/call/{api_name}", "/gradio_api/queue/join", "/gradio_api/cancel",
    "/gradio_api/call/{api_name}/{event_id}", "/gradio_api/call/v2/{api_name}/{event_id}", "/gradio_api/queue/data",
    "/gradio_api/component_server/", "/gradio_api/component_server", "/gradio_api/queue/status",
    "/gradio_api/upload_progress", "/gradio_api/upload", "/gradio_api/startup-events", "/gradio_api/theme.css",
    "/gradio_api/process_recording", "/gradio_api/vibe-edit", "/gradio_api/vibe-edit/", "/gradio_api/undo-vibe-edit",
    "/gradio_api/undo-vibe-edit/", "/gradio_api/vibe-code", "/gradio_api/vibe-code/", "/gradio_api/vibe-starter-queries",
    "/gradio_api/vibe-starter-queries/",
}
KNOWN = NO_FILES | set(files.FILE_ROUTES) | files.FRONTEND_ROUTES | files.REFUSED_ROUTES


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client-side normalisation of ./ or ../)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_every_route_of_the_app_is_classified(shared_demo):
    _, _, demo = shared_demo
    routes = {r.path for r in files.app_routes(demo.server_app.routes)}
    unknown = sorted(routes - KNOWN)
    assert not unknown, f"routes no one has classified (do they serve files by path?): {unknown}"
    assert {r for r in routes if ":path}" in r} <= set(files.FILE_ROUTES) | files.FRONTEND_ROUTES | files.REFUSED_ROUTES


def private_files(runner, images):
    """A finished, published run of a visitor, and the paths of every file of it and of the
    studio's own folder that no route may serve."""
    _, owner = webui.identify(None)
    run_id = runner.submit({"max_train_steps": 2}, images, owner=owner)
    info = wait_for(runner, run_id, {"done"})
    runner.publish(run_id)
    legacy_key = runner.runs_dir / visitors.SCRATCH / visitors.BROWSER_KEY_FILE  # as studios before kept one
    legacy_key.parent.mkdir(parents=True, exist_ok=True)
    legacy_key.write_text("an old studio's key")
    names = ["job.json", "config.json", "process.json", "train.log", "events.jsonl", "instance/a.png",
             "tuner.safetensors", "samples/step-2-0.png", "checkpoints/checkpoint-2/tuner_state.safetensors"]
    return info, [(info.dir / n).resolve() for n in names] + [legacy_key.resolve()]


def spellings(path, cwd):
    """Ways of naming `path` in a URL: absolute, percent-encoded, with ./ and ../ detours, and
    relative to the server's folder (Gradio resolves relative paths against it)."""
    rel = os.path.relpath(path, cwd)
    return [str(path), urllib.parse.quote(str(path)), f"{path.parent}/./{path.name}",
            f"{path.parent}/../{path.parent.name}/{path.name}", rel, f"./{rel}", urllib.parse.quote(rel)]


def test_no_file_route_serves_anything_of_the_runs_folder(shared_studio, images):
    url, runner = shared_studio
    _, private = private_files(runner, images)
    example = next(iter(webui.model.example_concepts().values()))[0]
    for route in ("/gradio_api/file=", "/gradio_api/file/"):
        assert raw_get(url, route + urllib.parse.quote(example))[0] == 200, f"{route} serves what it should"
        for path in private:
            assert path.is_file(), path
            for shown in spellings(path, os.getcwd()):
                status, _ = raw_get(url, route + shown)
                assert status == 403, f"{route}{shown} was served ({status})"


def test_a_symlink_is_judged_by_where_it_points_not_where_it_lies(shared_studio, tmp_path, monkeypatch):
    """A link inside an allowed root (the upload folder) to a file of the runs folder is refused;
    a link outside every root to an example concept is served: the real path decides."""
    url, runner = shared_studio
    uploads = tmp_path / "uploads"  # the upload folder, moved here so nothing is left in the system temp folder
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    assert uploads.resolve() in files.allowed_roots()
    private = runner.runs_dir / "private.png"
    private.write_bytes(b"a private picture")
    inward = uploads / "innocent.png"
    inward.symlink_to(private)
    example = Path(next(iter(webui.model.example_concepts().values()))[0])
    outward = tmp_path / "outside" / "concept.png"
    outward.parent.mkdir()
    outward.symlink_to(example.resolve())
    for route in ("/gradio_api/file=", "/gradio_api/file/"):
        assert raw_get(url, route + urllib.parse.quote(str(inward)))[0] == 403, "a link in an allowed root out to the runs folder"
        status, body = raw_get(url, route + urllib.parse.quote(str(outward)))
        assert (status, body) == (200, example.read_bytes()), "a link from outside into an allowed root"


def test_the_file_route_fetches_no_url_and_the_unused_path_routes_serve_nothing(shared_studio):
    url, _ = shared_studio
    for path in ("/gradio_api/file=http://127.0.0.1:1/x.png", "/gradio_api/file=https://example.com/a.png",
                 "/gradio_api/file=//example.com/a.png", "/gradio_api/proxy=http://127.0.0.1:1/x",
                 "/gradio_api/custom_component/x/client/y/index.js", "/gradio_api/stream/a/b/0/playlist-file",
                 "/monitoring/summary", "/gradio_api/dev/reload"):
        assert raw_get(url, path)[0] == 403, path
    assert raw_get(url, "/")[0] == 200, "the page itself"
    assert raw_get(url, "/static/../../../etc/passwd")[0] in (403, 404)


def test_the_page_holds_no_secret(shared_studio, images, monkeypatch):
    """What the server keeps to itself never reaches a page: no file of the runs folder (the
    BrowserState key of old), no visitor's secret or owner id. The BrowserState key in the page
    is public by Gradio's design, and nothing depends on it."""
    url, runner = shared_studio
    secret, owner = webui.identify(None)
    run_id = runner.submit({"max_train_steps": 2}, images, owner=owner)
    wait_for(runner, run_id, {"done"})
    page = raw_get(url, "/config")[1].decode() + raw_get(url, "/gradio_api/info")[1].decode() + raw_get(url, "/")[1].decode()
    for kept in (secret, owner, run_id):
        assert kept not in page
    stored = {p.read_text(errors="replace").strip() for p in runner.runs_dir.rglob("*") if p.is_file() and p.stat().st_size < 4096}
    config = json.loads(raw_get(url, "/config")[1])
    keys = [c["props"]["secret"] for c in config["components"] if c.get("type") == "browserstate"]
    # the visitor's and the Train form's (webui.train_tab.FORM_STORAGE_KEY)
    assert keys == [visitors.BROWSER_STATE_KEY] * 2, "the public key, not one kept on the server"
    assert not any(k in stored for k in keys)


def test_a_restarted_studio_reads_its_visitors_browsers(tmp_path, monkeypatch):
    """The BrowserState key stays the same across restarts (so a visitor stays who they are); a
    studio that kept one before goes on using it, so its visitors are not lost either."""
    monkeypatch.delenv(visitors.BROWSER_KEY_ENV, raising=False)
    runs = tmp_path / "runs"
    assert visitors.browser_state_key(runs) == visitors.browser_state_key(runs) == visitors.BROWSER_STATE_KEY
    assert not (runs / visitors.SCRATCH / visitors.BROWSER_KEY_FILE).exists(), "no key file is made"
    legacy = runs / visitors.SCRATCH / visitors.BROWSER_KEY_FILE
    legacy.parent.mkdir(parents=True)
    legacy.write_text("kept-by-an-older-studio\n")
    assert visitors.browser_state_key(runs) == "kept-by-an-older-studio"
    monkeypatch.setenv(visitors.BROWSER_KEY_ENV, "from-the-space-settings")
    assert visitors.browser_state_key(runs) == "from-the-space-settings"
