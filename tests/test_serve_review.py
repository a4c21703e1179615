"""Review findings for `dropless serve` and `dropless generate`, one live server for the module (the
tiny random model of test_serve_server)."""

import pytest

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
