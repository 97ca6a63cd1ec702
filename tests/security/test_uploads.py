"""Uploads (issue 13, item 5): what a visitor's browser or API client uploads and the studio
refuses is deleted at once, the rest expires, and a shared studio's upload route has a limit
below a full fine-tune's 4 GB."""

import re
import secrets
from pathlib import Path

from gradio.utils import get_upload_folder

import webui
from trainers.service.uploads import MAX_TUNER_BYTES, SHARED_MAX_UPLOAD_BYTES, discard


def stored(name: str) -> list[Path]:
    return list(Path(get_upload_folder()).rglob(name))


def test_refused_uploads_are_deleted_from_the_server(shared_studio, tmp_path):
    from gradio_client import Client, handle_file

    url, _ = shared_studio
    client = Client(url, verbose=False)
    image = tmp_path / f"not-an-image-{secrets.token_hex(4)}.png"
    image.write_bytes(b"hello, certainly not a PNG")
    files, _ = client.predict([handle_file(image)], api_name="/on_upload")
    assert files is None, "the refused batch is cleared from the box"
    assert stored(image.name) == []


def test_only_uploads_are_ever_discarded(tmp_path):
    """The Runs tab's import deletes a refused tuner file the same way (its events exist once
    the tab is opened, out of the API's reach): what is outside the upload folder stays."""
    inside = Path(get_upload_folder()) / secrets.token_hex(8) / "refused.safetensors"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"junk")
    example = tmp_path / "example.png"
    example.write_bytes(b"an example image")
    sneaky = inside.parent / "link.png"
    sneaky.symlink_to(example)
    discard([inside, example, sneaky, inside.parent / ".." / ".." / example.name], get_upload_folder())
    assert not inside.exists() and example.read_bytes() == b"an example image"
    sneaky.unlink()
    inside.parent.rmdir()


def test_uploads_expire_and_a_shared_studio_bounds_the_upload_route(tmp_path):
    from tests.test_jobs import make_runner
    from webui.model import describe

    runner = make_runner(tmp_path / "runs")
    assert webui.launch_options(runner, "127.0.0.1", 7860)["max_file_size"] == MAX_TUNER_BYTES
    assert webui.launch_options(runner, "127.0.0.1", 7860, shared=True)["max_file_size"] == SHARED_MAX_UPLOAD_BYTES
    demo = webui.build(runner, describe(None), device="cpu", preset="CPU demo", detected="test", shared=True)
    frequency, age = demo.delete_cache
    assert frequency <= 3600 and age <= 86400


def test_a_visitors_refused_batch_does_not_delete_anothers_upload(shared_studio, tmp_path):
    """Gradio stores an upload under a hash of its bytes: visitors who send the same file share
    its path. Bob's batch is refused for another file in it; Alice's copy of the good one stays."""
    from gradio_client import Client, handle_file
    from PIL import Image

    url, _ = shared_studio
    good = tmp_path / f"star-{secrets.token_hex(4)}.png"
    Image.new("RGB", (96, 96), (200, 40, 40)).save(good)
    bad = tmp_path / f"broken-{secrets.token_hex(4)}.png"
    bad.write_bytes(b"certainly not a PNG")
    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    alice.predict([handle_file(good)], api_name="/on_upload")
    alices = stored(good.name)  # her upload (and the preview's copy)
    assert alices, "alice's upload is on the server"
    kept, _ = bob.predict([handle_file(good), handle_file(bad)], api_name="/on_upload")
    assert kept is not None and len(kept) == 1, "bob's bad file is refused alone; his good one stays in the box"
    assert all(p.is_file() for p in alices), "alice's file, the same bytes as bob's, is still there"
    assert stored(bad.name) == [], "the file refused for what it is is deleted"


def post(url: str, path: str, size: int, headers=()) -> int:
    """The status of a POST of `size` bytes to `path`, sent as written."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        conn.request("POST", path, body=b"\0" * size, headers={"Content-Type": "application/octet-stream", **dict(headers)})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def quota_studio(tmp_path, per_client: int):
    import dataclasses

    from tests.security.conftest import serve_shared
    from tests.test_jobs import make_runner
    from trainers.service import limits

    caps = dataclasses.replace(limits.SHARED, upload_per_client=per_client, min_free_disk=0)
    runner = make_runner(tmp_path / "runs", limits=caps)
    return serve_shared(runner)


def test_every_route_that_takes_a_body_counts_against_the_quota(tmp_path):
    """Issue 39, item 9: not only the upload route; a recording sent to /process_recording, or
    any body sent anywhere, is bytes a client makes the server take."""
    from webui import files

    url, demo = quota_studio(tmp_path, 16 << 10)
    try:
        routes = files.app_routes(demo.server_app.routes)
        assert not [r.path for r in routes if type(r).__name__.startswith("WebSocket")], "a websocket's messages bypass the quota"
        body_methods = {"POST", "PUT", "PATCH", "DELETE"}
        with_body = sorted({r.path for r in routes if set(getattr(r, "methods", None) or ()) & body_methods})
        assert "/gradio_api/upload" in with_body and "/gradio_api/process_recording" in with_body
        for template in with_body:
            path = re.sub(r"\{[^}]*\}", "x", template)
            assert post(url, path, 20 << 10) == 429, f"{template} took a body over the client's quota"
        assert post(url, "/gradio_api/upload", 0) != 429, "a request without a body costs nothing"
    finally:
        demo.close()


def test_a_forwarded_for_header_from_loopback_gives_no_fresh_quota(tmp_path):
    """Issue 39, item 9: uvicorn takes the client's address from X-Forwarded-For when the
    connection comes from 127.0.0.1; with no proxy in front (--proxy-hops 0) the studio counts the
    connection's own address, whatever the header says."""
    url, demo = quota_studio(tmp_path, 64 << 10)
    try:
        assert post(url, "/gradio_api/upload", 40 << 10) != 429
        for forged in ("6.6.6.6", "6.6.6.6, 7.7.7.7", "::1"):
            assert post(url, "/gradio_api/upload", 40 << 10, {"X-Forwarded-For": forged}) == 429, forged
    finally:
        demo.close()
