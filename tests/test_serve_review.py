"""Review findings for `dropless serve` and `dropless generate`, one live server for the module (the
tiny random model of test_serve_server)."""

import socket
from pathlib import Path

import pytest

from dropless import cli
from tests import test_serve_server_edges as edges
from tests.test_cli import _fails

live, run_dir = edges.live, edges.run_dir   # the module-scoped fixtures
MODEL = edges.MODEL


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["\udcff"]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}]}, "messages"),
])
def test_a_lone_surrogate_is_400_not_500(live, path, body, param):
    """JSON may spell a lone surrogate ("\\ud800"), which json.loads keeps: UTF-8 cannot encode it,
    and the tokenizer's encode raised, a 500 with a traceback in the server's log."""
    message = edges.refused(live, path, {"model": MODEL, "max_tokens": 2, **body}, param)
    assert "surrogate" in message


# ---- the command line -------------------------------------------------------------------------

def test_generate_prompt_that_is_not_utf8_is_one_line(capsys, run_dir):
    """argv's bytes that are not UTF-8 (a Latin-1 terminal's "é") come as lone surrogates: the
    tokenizer's encode raised UnicodeEncodeError, a traceback."""
    _fails(capsys, ["generate", str(run_dir), "--prompt", "caf\udce9"],
           "--prompt 'caf\\udce9' is invalid: must be UTF-8 text")


def test_serve_checks_an_ipv6_host_as_uvicorn_binds_it(capsys, monkeypatch, run_dir):
    """The port check before the model loads bound an IPv4 socket whatever the host: `--host ::1`
    (which uvicorn serves) was refused with "Address family for hostname not supported"."""
    import dropless.serve.server as server

    monkeypatch.setattr(server, "serve", lambda served, engine, host, port, max_queue, *rest:
                        print(f"up {host}"))
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as busy:
        port = busy.getsockname()[1]
        _fails(capsys, ["serve", str(run_dir), "--host", "::1", "--port", str(port)],
               f"cannot listen on --host ::1 --port {port}: Address already in use")
    assert cli.main(["serve", str(run_dir), "--host", "::1", "--port", str(port),
                     "--device", "cpu"]) == 0
    assert "up ::1" in capsys.readouterr().out


@pytest.mark.parametrize("fields, param", [({"best_of": True}, "best_of"), ({"echo": 0}, "echo")])
def test_not_implemented_parameters_are_refused_whatever_their_type(live, fields, param):
    """0 == False and True == 1 in Python: logprobs=0, which asks a completion for the sampled
    tokens' log probabilities, passed as the no-op false, and the reply came without them
    (logprobs are served now, and a bool there is refused: test_serve_logprobs)."""
    edges.refused(live, "/v1/completions", {"model": MODEL, "prompt": "a", **fields}, param)


def test_served_model_name_and_chat_template(capsys, monkeypatch, run_dir, tmp_path):
    """--served-model-name is the id clients name; --chat-template replaces the model's, checked
    by one render before the model loads (a broken one is one line)."""
    import dropless.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda served, engine, host, port, max_queue, *rest:
                        seen.update(name=served.name, template=served.chat_template))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    argv = ["serve", str(run_dir), "--device", "cpu", "--port", str(socket_port())]
    assert cli.main([*argv, "--served-model-name", "org/tiny", "--chat-template",
                     str(template)]) == 0
    assert seen == {"name": "org/tiny", "template": template.read_text()}
    capsys.readouterr()
    template.write_text("{% for m in messages %}")
    _fails(capsys, [*argv, "--chat-template", str(template)], f"--chat-template {template}: ")
    _fails(capsys, [*argv, "--chat-template", str(tmp_path / "none")], "none")
    for bad in ["", "a\nb", "x" * 257]:
        _fails(capsys, [*argv, "--served-model-name", bad],
               "--served-model-name " + ascii(bad)[:20])


def socket_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_served_id_is_the_directory_as_named(tmp_path, monkeypatch):
    """A link's own name, not its target's; a Hugging Face cache snapshot's repository (org/name),
    not its revision's hash, which no client would guess."""
    from dropless.serve.text import served_name
    target = tmp_path / "f3a9c0"
    target.mkdir()
    (tmp_path / "my-model").symlink_to(target)
    assert served_name(tmp_path / "my-model") == "my-model"
    snapshot = tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "f3a9c0"
    snapshot.mkdir(parents=True)
    assert served_name(snapshot) == "Org/Some-Model"
    assert served_name(tmp_path / "hub" / "models--Org--Some-Model") == "models--Org--Some-Model"
    monkeypatch.chdir(target)
    assert served_name(Path(".")) == "f3a9c0"
