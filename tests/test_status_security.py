"""The status page attacked as an outsider would, over real HTTP on loopback: no token, a
wrong token, path traversal, other methods, CORS, DNS rebinding; and what it serves to the
holder of the token (the view only: no config paths, no files of the run folder)."""

import http.client
import json

import httpx
import pytest

from fedscan.shared.status.serve import StatusOptions, StatusServer, is_loopback

SECRET_PATH = "/hospitals/site-a/private/scans"
SUMMARY = {
    "mode": "federated", "task": "segmentation", "strategy": "fedavg",
    "sites": ["site-a", "site-b"],
    "rounds": [{"round": 1, "seconds": 3.0,
                "train": {"site-a": {"loss": 0.5, "num_examples": 2}},
                "evaluate": {"site-a": {"dice": 0.8, "num_examples": 1}},
                "aggregate": {"dice": 0.8}}],
    "config": {"rounds": 2, "sites": [{"name": "site-a", "data": SECRET_PATH}]},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("status")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    (run / "checkpoints" / "round_001.pt").write_bytes(b"weights")
    (tmp_path / "outside.txt").write_text("outside the run folder")
    return run


@pytest.fixture(scope="module")
def off_loopback(run_dir):
    """The page as bound to a non-loopback address (0.0.0.0: token required), listening on
    loopback for this test."""
    server = StatusServer(run_dir, StatusOptions(host="0.0.0.0", port=0),
                          bind="127.0.0.1").start()
    yield server, f"http://127.0.0.1:{server.port}"
    server.stop()


def raw_get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET with the path sent exactly as given (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_off_loopback_binds_require_a_long_random_token():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    first = StatusOptions(host="0.0.0.0").resolved_token()
    second = StatusOptions(host="192.0.2.7").resolved_token()
    assert first and second and first != second and len(first) >= 32
    assert StatusOptions(host="127.0.0.1").resolved_token() is None


def test_without_the_token_everything_is_refused(off_loopback, run_dir):
    server, base = off_loopback
    assert "?token=" in server.url
    for path in ("/", "/api/status", "/static/status.js", "/static/plotly.min.js",
                 "/nothing-here", "/docs", "/openapi.json"):
        response = httpx.get(base + path)
        assert response.status_code == 401, path
        assert b"site-a" not in response.content and b"dice" not in response.content


def test_a_wrong_token_is_refused_however_it_is_sent(off_loopback):
    server, base = off_loopback
    token = server.url.split("?token=")[1]
    for wrong in ("x", token[:-1], token + "x", token.upper() if token.upper() != token else "y",
                  "Bearer", " " + token + "!"):
        assert httpx.get(base + "/api/status",
                         headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        assert httpx.get(base + "/api/status",
                         cookies={"fedscan_status": wrong}).status_code == 401
        response = httpx.get(base + "/", params={"token": wrong})
        assert response.status_code == 401 and "set-cookie" not in response.headers
    assert httpx.get(base + "/api/status", cookies={"fedscan_status": ""}).status_code == 401
    # The query parameter logs in at / only; it is no key to the data endpoint.
    assert httpx.get(base + "/api/status", params={"token": token}).status_code == 401


def test_the_token_opens_the_page_once_then_a_cookie_carries_it(off_loopback):
    server, base = off_loopback
    token = server.url.split("?token=")[1]
    response = httpx.get(base + "/", params={"token": token})
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    with httpx.Client(base_url=base, cookies=response.cookies) as client:
        assert client.get("/").status_code == 200
        view = client.get("/api/status").json()
    assert [s["name"] for s in view["sites"]] == ["site-a", "site-b"]
    assert view["per_round"][0]["sites"]["site-a"]["metrics"]["dice"] == 0.8
    headers = {"Authorization": f"Bearer {token}"}
    answer = httpx.get(base + "/api/status", headers=headers)
    assert answer.status_code == 200
    # Only the computed view: no site data paths from the config.
    assert SECRET_PATH not in answer.text
    for key in ("content-security-policy", "x-content-type-options", "x-frame-options"):
        assert key in answer.headers
    assert "script-src 'self'" in answer.headers["content-security-policy"]


def test_no_path_reaches_a_file(off_loopback):
    server, _ = off_loopback
    token = server.url.split("?token=")[1]
    auth = {"Authorization": f"Bearer {token}"}
    for path in ("/summary.json", "/checkpoints/round_001.pt", "/static/../summary.json",
                 "/static/%2e%2e/summary.json", "/static/..%2fsummary.json",
                 "/static/..%2f..%2foutside.txt", "/..%2f..%2foutside.txt",
                 "/static/../../outside.txt", "//etc/passwd", "/static/..%5c..%5coutside.txt",
                 "/static/plotly.min.js/../../../../etc/passwd", "/static/index.html"):
        status, body = raw_get(server.port, path, auth)
        assert status == 404, (path, status)
        assert b"weights" not in body and b"outside the run" not in body
        assert b"root:" not in body and b"rounds" not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
                                    "TRACE"])
def test_only_get_is_answered(off_loopback, method):
    server, base = off_loopback
    token = server.url.split("?token=")[1]
    for path in ("/", "/api/status"):
        response = httpx.request(method, base + path, headers={
            "Authorization": f"Bearer {token}", "Origin": "http://evil.example",
            "Access-Control-Request-Method": "GET"})
        assert response.status_code == 405, (method, path)
        assert "access-control-allow-origin" not in response.headers


def test_no_cors_for_other_origins(off_loopback):
    server, base = off_loopback
    token = server.url.split("?token=")[1]
    response = httpx.get(base + "/api/status", headers={"Authorization": f"Bearer {token}",
                                                        "Origin": "http://evil.example"})
    assert response.status_code == 200
    assert not any(k.startswith("access-control-") for k in response.headers)


def test_loopback_page_answers_only_loopback_host_names(run_dir):
    """No token on loopback (the default), but a page reached through DNS rebinding (another
    site's name resolving to 127.0.0.1) is refused."""
    server = StatusServer(run_dir, StatusOptions(host="127.0.0.1", port=0)).start()
    try:
        assert "token" not in server.url
        for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
            status, body = raw_get(server.port, "/api/status", {"Host": host})
            assert status == 200 and b"site-a" in body
        for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example"):
            status, body = raw_get(server.port, "/api/status", {"Host": host})
            assert status == 400 and b"site-a" not in body
    finally:
        server.stop()


def test_server_block_serves_the_page_over_https_with_the_server_certificate(tmp_path, run_dir,
                                                                          monkeypatch):
    """`server: {status_port, status_host}` off loopback: HTTPS with the SuperLink's
    certificate (consortium CA) and the token; plain HTTP gets nowhere."""
    from fedscan.server.deployment import _start_status_page
    from fedscan.server.settings import ServerBlock, ServerSettings
    from fedscan.shared.certs import create_ca, create_server_cert
    from fedscan.shared.config import parse_config

    ca, _ = create_ca(tmp_path / "ca")
    cert, key = create_server_cert(tmp_path / "ca", ["127.0.0.1"], out_dir=tmp_path / "server")
    block = ServerBlock(cert=str(cert), key=str(key), status_port=0, status_host="0.0.0.0")
    settings = ServerSettings(path=tmp_path / "server.yaml", server=block,
                              federation=parse_config({"sites": [{"name": "a", "data": "/x"}]}))
    # The policy of a 0.0.0.0 bind, listening on loopback for the test.
    import fedscan.shared.status.serve as serve

    bound = []
    original = serve.StatusServer.__init__

    def on_loopback(self, run_dir, options, bind=None):
        bound.append(options.host)
        original(self, run_dir, options, bind="127.0.0.1")

    monkeypatch.setattr(serve.StatusServer, "__init__", on_loopback)
    page = _start_status_page(settings, run_dir, insecure=False)
    try:
        assert bound == ["0.0.0.0"] and page.url.startswith("https://")
        token = page.url.split("?token=")[1]
        base = f"https://127.0.0.1:{page.port}"
        assert httpx.get(base + "/api/status", verify=str(ca)).status_code == 401
        answer = httpx.get(base + "/api/status", verify=str(ca),
                           headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()["sites"][0]["name"] == "site-a"
        login = httpx.get(base + "/", params={"token": token}, verify=str(ca))
        assert "secure" in login.headers["set-cookie"].lower()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{page.port}/api/status", timeout=5)
    finally:
        page.stop()
