"""`dropless serve --api-key`: every endpoint but /health asks for the bearer token (OpenAI's 401
shape, before the body is read); the CLI's checks of the key and its warning for a server open to
the network without one."""

import json
import urllib.error
import urllib.request

import pytest

from dropless import cli
from tests import test_serve_server as live_server

openai, run_dir = live_server.openai, live_server.run_dir
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(run_dir):
    s = live_server.InProcessServer(run_dir, api_key=KEY)
    yield s
    s.stop()


def call(port, path, headers=None, data=None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("headers", [{}, {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": KEY}, {"Authorization": "Bearer "}])
def test_without_the_key_401(guarded, headers):
    for path, data in [("/v1/models", None), (f"/v1/models/{guarded.served.name}", None),
                       ("/v1/completions", b"not json"), ("/v1/chat/completions", b"{}")]:
        code, reply = call(guarded.port, path, headers, data)
        assert code == 401, (path, reply)   # not 400: the body is not read before the key
        assert reply["error"]["code"] == "invalid_api_key" and reply["error"]["type"] == (
            "invalid_request_error") and "Authorization: Bearer <key>" in reply["error"]["message"]
    assert call(guarded.port, "/health", headers)[0] == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{guarded.port}/metrics") as r:   # open too
        assert r.status == 200


def test_with_the_key(guarded):
    assert guarded.client.api_key != KEY   # the fixture's client sends no key of ours
    with pytest.raises(openai.AuthenticationError):
        guarded.client.completions.create(model=guarded.served.name, prompt="a", max_tokens=2)
    client = openai.OpenAI(base_url=guarded.client.base_url, api_key=KEY, max_retries=0)
    out = client.completions.create(model=guarded.served.name, prompt="a", max_tokens=3)
    assert out.usage.completion_tokens == 3
    code, reply = call(guarded.port, "/v1/models", {"Authorization": f"bearer  {KEY}"})
    assert code == 200 and reply["data"][0]["id"] == guarded.served.name


def test_cli_key_and_open_host_warning(capsys, monkeypatch, run_dir):
    import dropless.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda served, engine, host, port, max_queue, api_key,
                        *rest: seen.update(host=host, api_key=api_key))
    monkeypatch.delenv("DROPLESS_API_KEY", raising=False)
    argv = ["serve", str(run_dir), "--device", "cpu", "--port", str(live_server.free_port())]
    assert cli.main([*argv, "--host", "0.0.0.0"]) == 0 and seen["api_key"] is None
    assert "warning: --host 0.0.0.0 without --api-key" in capsys.readouterr().err
    assert cli.main([*argv, "--host", "0.0.0.0", "--api-key", "k"]) == 0 and seen["api_key"] == "k"
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("DROPLESS_API_KEY", "from-env")
    assert cli.main(argv) == 0 and seen["api_key"] == "from-env"
    capsys.readouterr()
    for bad in ["", " k"]:
        assert cli.main([*argv, "--api-key", bad]) == 1
        assert capsys.readouterr().err == ("dropless: error: --api-key (hidden) is invalid: must "
                                           "be a non-empty string without surrounding spaces\n")


# ---- --allowed-origins: browsers (CORS) ---------------------------------------------------------

PAGE = "http://localhost:3000"


@pytest.fixture(scope="module")
def browsable(run_dir):
    s = live_server.InProcessServer(run_dir, api_key=KEY, allowed_origins=(PAGE,))
    yield s
    s.stop()


def raw(port, path, method, headers, data=None) -> tuple[int, dict]:
    """(status, the reply's headers, lower-cased)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


PREFLIGHT = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_a_listed_page_may_call_from_a_browser_with_the_key(browsable):
    """The preflight is answered without the key (browsers send none with it); replies, a 401
    included, carry the origin, or the page could not read them."""
    code, headers = raw(browsable.port, "/v1/chat/completions", "OPTIONS", PREFLIGHT)
    assert code == 200 and headers["access-control-allow-origin"] == PAGE
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()
    body = json.dumps({"model": browsable.served.name, "prompt": "a", "max_tokens": 1}).encode()
    for key, status in ((KEY, 200), ("wrong", 401)):
        code, headers = raw(browsable.port, "/v1/completions", "POST", {
            "Origin": PAGE, "Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            body)
        assert code == status and headers["access-control-allow-origin"] == PAGE


def test_another_page_and_a_server_without_origins_get_no_cors(browsable, guarded):
    code, headers = raw(browsable.port, "/v1/chat/completions", "OPTIONS",
                        {**PREFLIGHT, "Origin": "http://evil.example"})
    assert code == 400 and "access-control-allow-origin" not in headers
    code, headers = raw(guarded.port, "/v1/chat/completions", "OPTIONS", PREFLIGHT)
    assert code in (401, 405) and "access-control-allow-origin" not in headers


@pytest.mark.parametrize("value, passed", [
    ("*", ("*",)), (f"{PAGE}, https://chat.example.org", (PAGE, "https://chat.example.org")),
    ("", ()), (None, ())])
def test_serve_passes_the_origins(capsys, monkeypatch, run_dir, value, passed):
    import dropless.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a: seen.update(origins=a[-1]))
    flags = [] if value is None else ["--allowed-origins", value]
    assert cli.main(["serve", str(run_dir), "--device", "cpu",
                     "--port", str(live_server.free_port()), *flags]) == 0
    assert seen["origins"] == passed


@pytest.mark.parametrize("value", ["localhost:3000", "http://a.example/chat", "ftp://a.example",
                                   "http://a.example,*x"])
def test_serve_refuses_a_bad_origin_in_one_line(capsys, monkeypatch, run_dir, value):
    from dropless.serve import text
    from tests.test_cli import _fails

    monkeypatch.setattr(text, "load_served_model", lambda *a: pytest.fail("the model was loaded"))
    _fails(capsys, ["serve", str(run_dir), "--port", str(live_server.free_port()),
                    "--allowed-origins", value], "--allowed-origins")
