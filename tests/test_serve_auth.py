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
    monkeypatch.setattr(server, "serve", lambda served, engine, host, port, max_queue, api_key:
                        seen.update(host=host, api_key=api_key))
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
