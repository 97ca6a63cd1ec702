"""What a client may send, case by case: the upload quota (webui.files.UploadQuota: which
requests it counts, over what window, per client and in all, when it is installed, who a client
is) and trainers.service.uploads' own bounds (files per run, bytes per file, names, what a refusal
deletes), each at one below, at and one above its limit."""

from types import SimpleNamespace

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import webui
from trainers.service import limits, uploads
from trainers.service.uploads import UploadError
from webui import files

KB = 1 << 10


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def quota(per_client=10 * KB, total=25 * KB, hops=0):
    clock = Clock()
    return files.UploadQuota(None, per_client=per_client, total=total, hops=hops, clock=clock), clock


# -- the quota's arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "size", "refused"), [(0, 10 * KB - 1, False), (0, 10 * KB, False), (0, 10 * KB + 1, True),
                                                       (6 * KB, 4 * KB - 1, False), (6 * KB, 4 * KB, False),
                                                       (6 * KB, 4 * KB + 1, True)])
def test_a_client_may_send_up_to_its_quota(sent, size, refused):
    q, _ = quota()
    if sent:
        assert q.charge("1.1.1.1", sent) is None
    why = q.charge("1.1.1.1", size)
    assert (why is not None) is refused
    if refused:
        assert why.startswith("this address has uploaded")
    assert q.charge("2.2.2.2", 10 * KB) is None, "another client's quota is its own"


@pytest.mark.parametrize(("size", "refused"), [(KB - 1, False), (KB, False), (KB + 1, True)])
def test_all_clients_together_may_send_up_to_the_total(size, refused):
    q, _ = quota(per_client=10 * KB, total=25 * KB)
    for client in ("1.1.1.1", "2.2.2.2", "3.3.3.3"):
        assert q.charge(client, 8 * KB) is None
    why = q.charge("4.4.4.4", size)
    assert (why == "the studio has taken all the uploads it takes in an hour; try again later") is refused
    assert (why is None) is not refused


def test_a_refused_request_is_not_counted():
    q, _ = quota()
    assert q.charge("1.1.1.1", 8 * KB) is None
    assert q.charge("1.1.1.1", 3 * KB) is not None
    assert q.charge("1.1.1.1", 2 * KB) is None, "8 + 2 is the quota: the refused 3 took nothing"


@pytest.mark.parametrize(("later", "counted"), [(60.0, True), (3599.0, True), (3600.0, True), (3600.5, False),
                                                (7200.0, False)])
def test_the_window_is_an_hour(later, counted):
    assert files.WINDOW_SECONDS == 3600
    q, clock = quota()
    assert q.charge("1.1.1.1", 8 * KB) is None
    clock.now = later
    assert (q.charge("1.1.1.1", 4 * KB) is not None) is counted
    q, clock = quota(per_client=None, total=10 * KB)
    assert q.charge("1.1.1.1", 8 * KB) is None
    clock.now = later
    assert (q.charge("2.2.2.2", 4 * KB) is not None) is counted, "the total's window too"


def test_the_window_slides():
    q, clock = quota()
    q.charge("1.1.1.1", 5 * KB)
    clock.now = 1800
    q.charge("1.1.1.1", 5 * KB)
    clock.now = 3601  # the first has left the window, the second not
    assert q.charge("1.1.1.1", 5 * KB) is None and q.charge("1.1.1.1", 1) is not None


@pytest.mark.parametrize(("per_client", "total"), [(None, 25 * KB), (10 * KB, None), (None, None)])
def test_a_cap_that_is_off_bounds_nothing(per_client, total):
    q, _ = quota(per_client, total)
    results = [q.charge("1.1.1.1", 9 * KB) for _ in range(3)]
    assert (results[1] is not None) is (per_client is not None)
    assert (results[2] is not None) is (per_client is not None or total is not None)


# -- who a client is ----------------------------------------------------------------------------------

def scope(xff=(), peer="10.0.0.1"):
    return {"headers": [(b"x-forwarded-for", v.encode()) for v in xff], "client": (peer, 1)}


@pytest.mark.parametrize(("xff", "hops", "client"), [
    ((), 0, "10.0.0.1"), ((), 1, "10.0.0.1"),
    (("6.6.6.6",), 0, "10.0.0.1"),  # no proxy in front: whatever the client writes is its own claim
    (("1.2.3.4",), 1, "1.2.3.4"),
    (("6.6.6.6, 1.2.3.4",), 1, "1.2.3.4"),  # the client's claim, then what the proxy saw
    (("6.6.6.6,1.2.3.4 ",), 1, "1.2.3.4"),
    (("6.6.6.6", "1.2.3.4"), 1, "1.2.3.4"),  # two header lines are one list, in order
    (("6.6.6.6, 1.2.3.4, 10.1.1.1",), 2, "1.2.3.4"),
    (("1.2.3.4",), 2, "10.0.0.1"),  # fewer entries than proxies: not forwarded by them
    ((" , ",), 1, "10.0.0.1"),
])
def test_who_a_client_is(xff, hops, client):
    assert files.client_address(scope(xff), hops) == client


def test_the_web_server_trusts_no_forwarding_header_of_its_own(monkeypatch):
    env = {"FORWARDED_ALLOW_IPS": "127.0.0.1"}
    files.trust_no_forwarding(env)
    assert env == {"FORWARDED_ALLOW_IPS": ""}
    import uvicorn

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
    webui.launch_options(SimpleNamespace(runs_dir="runs", limits=limits.SHARED), "127.0.0.1", 7860, shared=True)
    config = uvicorn.Config(app=None)  # as Gradio's launch() makes it
    assert config.forwarded_allow_ips == ""


# -- which requests count ----------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "size"), [
    ([], 0), ([(b"content-length", b"0")], 0), ([(b"content-length", b"12")], 12), ([(b"content-length", b" 12 ")], 12),
    ([(b"content-length", b"12"), (b"content-length", b"12")], 12),
    ([(b"content-length", b"12"), (b"content-length", b"13")], None), ([(b"content-length", b"-1")], None),
    ([(b"content-length", b"1e3")], None), ([(b"transfer-encoding", b"chunked")], None),
    ([(b"transfer-encoding", b"chunked"), (b"content-length", b"5")], None),
])
def test_the_size_a_request_declares(headers, size):
    assert files.declared_body({"headers": headers}) == size


def ok(request):
    return PlainTextResponse("taken")


def app_with_quota(per_client=10 * KB, total=None):
    routes = [Route(p, ok, methods=["POST"]) for p in ("/gradio_api/upload", "/gradio_api/process_recording",
                                                       "/gradio_api/queue/join", "/gradio_api/run/{name}")]
    routes += [Route("/page", ok, methods=["GET", "PUT"])]
    lim = SimpleNamespace(upload_per_client=per_client, upload_total=total)
    return TestClient(Starlette(routes=routes, middleware=files.middleware("runs", limits=lim)))


@pytest.mark.parametrize(("method", "path"), [("POST", "/gradio_api/upload"), ("POST", "/gradio_api/process_recording"),
                                              ("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/run/predict"),
                                              ("PUT", "/page"), ("GET", "/page")])
def test_a_body_sent_to_any_route_counts(method, path):
    client = app_with_quota()
    assert client.request(method, path, content=b"\0" * (10 * KB)).status_code != 429, "at the quota"
    refused = client.request(method, path, content=b"\0")
    assert refused.status_code == 429 and refused.text.startswith("Upload refused: this address has uploaded")
    assert client.request("GET", "/page").status_code == 200, "a request without a body costs nothing"
    assert client.post("/gradio_api/upload", content=b"").status_code == 200


def test_a_body_of_undeclared_length_is_refused():
    client = app_with_quota()
    response = client.post("/gradio_api/process_recording", content=iter([b"\0" * KB] * 20))  # chunked
    assert response.status_code == 411 and response.text == "Length required."


@pytest.mark.parametrize(("lim", "installed"), [
    (None, False),
    (SimpleNamespace(upload_per_client=None, upload_total=None), False),
    (SimpleNamespace(upload_per_client=KB, upload_total=None), True),
    (SimpleNamespace(upload_per_client=None, upload_total=KB), True),
    (SimpleNamespace(upload_per_client=KB, upload_total=KB), True),
])
def test_the_quota_is_installed_when_a_cap_bounds_uploads(lim, installed):
    stack = files.middleware("runs", limits=lim, hops=1)
    assert [m.cls for m in stack] == [files.RoutePolicy] + ([files.UploadQuota] if installed else [])
    if installed:
        assert stack[1].kwargs == {"per_client": lim.upload_per_client, "total": lim.upload_total, "hops": 1}


@pytest.mark.parametrize(("shared", "installed"), [(True, True), (False, False)])
def test_a_shared_studio_has_the_quota_and_a_local_one_none(shared, installed, monkeypatch):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "")
    lim = limits.SHARED  # upload caps set even for the local one: still no quota there
    options = webui.launch_options(SimpleNamespace(runs_dir="runs", limits=lim), "127.0.0.1", 7860, shared=shared, proxy_hops=1)
    stack = options["app_kwargs"]["middleware"]
    assert [m.cls for m in stack] == [files.RoutePolicy] + ([files.UploadQuota] if installed else [])
    assert options["max_file_size"] == (uploads.SHARED_MAX_UPLOAD_BYTES if shared else uploads.MAX_TUNER_BYTES)
    if installed:
        assert stack[1].kwargs["hops"] == 1 and stack[1].kwargs["per_client"] == limits.SHARED.upload_per_client


# -- trainers.service.uploads: files, bytes, names -----------------------------------------------------------

def test_the_documented_bounds():
    assert (uploads.MAX_FILES, uploads.MAX_FILE_BYTES, uploads.MAX_NAME_CHARS) == (50, 20 << 20, 120)
    assert uploads.SHARED_MAX_UPLOAD_BYTES == 512 << 20 < uploads.MAX_TUNER_BYTES == 4 << 30


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "star.png"
    Image.new("RGB", (64, 64), "red").save(path)
    return path


@pytest.mark.parametrize(("count", "refused"), [(0, "no images"), (1, None), (49, None), (50, None),
                                              (51, "51 files: at most 50")])
def test_images_per_run(image, count, refused):
    if refused:
        with pytest.raises(UploadError, match=refused):
            uploads.check_images([image] * count)
    else:
        assert len(uploads.check_images([image] * count)) == count


@pytest.mark.parametrize(("margin", "refused"), [(1, False), (0, False), (-1, True)])
def test_bytes_per_image(image, margin, refused):
    limit = image.stat().st_size + margin
    if refused:
        with pytest.raises(UploadError, match="is over the .* limit per image"):
            uploads.check_images([image], max_bytes=limit)
    else:
        uploads.check_images([image], max_bytes=limit)


@pytest.mark.parametrize(("margin", "refused"), [(1, False), (0, False), (-1, True)])
def test_bytes_per_tuner_file(tmp_path, margin, refused):
    tuner = tmp_path / "t.safetensors"
    tuner.write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    limit = tuner.stat().st_size + margin
    if refused:
        with pytest.raises(UploadError, match="is over the .* limit"):
            uploads._check_file(tuner, limit)
    else:
        assert uploads._check_file(tuner, limit) == "t.safetensors"


@pytest.mark.parametrize(("name", "refused"), [
    ("a.png", None), ("a" * 120, None), ("a" * 121, "121 characters long; the limit is 120"), ("", "empty"), ("  ", "empty"),
    ("a/b.png", "path separator"), ("a\\b.png", "path separator"), ("..", "dot"), (".", "dot"), (".hidden", "dot"),
    ("a\x1b[31m.png", "control characters"), ("a\nb", "control characters"), ("a..b.png", None), ("ä ö.png", None),
])
def test_names(name, refused):
    if refused:
        with pytest.raises(UploadError, match=refused):
            uploads.check_name(name)
    else:
        assert uploads.check_name(name) == name.strip()


def test_a_refusal_deletes_only_plain_files_in_the_upload_folder(tmp_path):
    upload, sibling, outside = tmp_path / "gradio", tmp_path / "gradio2", tmp_path / "elsewhere"
    for folder in (upload / "h1", sibling, outside):
        folder.mkdir(parents=True)
    inside = upload / "h1" / "refused.png"
    files_ = {"inside": inside, "sibling": sibling / "a.png", "outside": outside / "b.png", "target": upload / "h1" / "kept.png"}
    for path in files_.values():
        path.write_bytes(b"x")
    (upload / "h1" / "out-link.png").symlink_to(outside / "b.png")
    (upload / "h1" / "in-link.png").symlink_to(files_["target"])
    uploads.discard([inside, sibling / "a.png", upload / "h1" / ".." / ".." / "elsewhere" / "b.png",
                     upload / "h1" / "out-link.png", upload / "h1" / "in-link.png", upload / "h1"], upload)
    assert not inside.exists()
    assert all(files_[k].exists() for k in ("sibling", "outside", "target")), "nothing outside, nor a link's target"
    assert (upload / "h1").is_dir()
