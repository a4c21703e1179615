"""Chat templates are code from a model directory: they render in a child process bounded in
memory, time and output. In-process, jinja2's sandbox bounded none of them: `{{ 'x' * 10**10 }}`
took 10 GB, nested loops ran for minutes holding the GIL the engine thread needs, and a template
could print gigabytes."""

import time

import pytest

pytest.importorskip("jinja2")

from dropless.serve.chat_template import ChatRenderer, render_chat  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


def test_a_template_renders_as_before():
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    messages = [{"role": "user", "content": "a \ud800 b"}, {"role": "assistant", "content": "é"}]
    assert render_chat(template, messages, {"bos_token": "<s>"}) == "<s><user>a \ud800 b<assistant>é"


@pytest.mark.parametrize("template, message, compiles", [
    ("{{ 'x' * 10**12 }}", "needs more than its", True),   # a terabyte
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "needs more than its|did not finish", True),   # doubled to a terabyte
    ("{% for i in range(100000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}",
     "did not finish in 0.5 s", True),   # 2e8 empty iterations: ~10 s in-process
    # folded as the template compiles, in one C call that no alarm stops: the child is killed
    ("{{ 10**10**10**10**10**10**10**10 }}", "did not finish in 0.5 s", False),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "renders more than 4096", True),
    ("{% if %}", "Expected an expression", False),
    ("{{ raise_exception('no system role') }}", "no system role", True),
])
def test_a_hostile_template_is_stopped_and_the_next_request_renders(template, message, compiles):
    """Each template is rendered only for a message "go"; the renderer then serves the next
    request (the child lived on, or was killed and started again), if the template compiles."""
    guarded = f"{{% if messages[0].content == 'go' %}}{template}{{% endif %}}ok"
    renderer = ChatRenderer(guarded, {}, max_chars=4096, seconds=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(ValueError, match=message):
            renderer.render([{"role": "user", "content": "go"}])
        assert time.monotonic() - start < 5
        if compiles:
            assert renderer.render(HI) == "ok"
    finally:
        renderer.close()


def test_a_large_request_to_a_stuck_renderer_does_not_block_the_server():
    """The child reads no more of a request while it renders: a write of a request larger than
    the pipe holds would block forever once its render hung."""
    renderer = ChatRenderer("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                            "{% endfor %}", {}, max_chars=2**24, seconds=0.3)
    try:
        for _ in range(2):   # the second: to the child started again
            start = time.monotonic()
            with pytest.raises(ValueError, match="did not finish"):
                renderer.render([{"role": "user", "content": "x" * 2**22}] * 4)
            assert time.monotonic() - start < 5
    finally:
        renderer.close()


def test_variables_reach_the_template_and_cannot_replace_its_own():
    """chat_template_kwargs: Qwen3's enable_thinking is a template variable; messages,
    add_generation_prompt and the special tokens keep the template's values."""
    template = ("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}")
    renderer = ChatRenderer(template, {"bos_token": "<s>"}, max_chars=4096)
    try:
        assert renderer.render(HI) == "<s>hi"
        assert renderer.render(HI, variables={"enable_thinking": False}) == "<s>hi/no_think"
        assert renderer.render(HI, variables={"messages": [], "bos_token": "!"}) == "<s>hi"
    finally:
        renderer.close()


def test_an_error_message_and_a_reply_are_bounded():
    """raise_exception('x' * 150 M) went to the server whole: the message is cut in the child,
    and the server reads no reply longer than a rendered prompt could be."""
    from dropless.serve.chat_template import ERROR_CHARS
    renderer = ChatRenderer("{{ raise_exception('x' * 10**7) }}", {}, max_chars=4096)
    try:
        with pytest.raises(ValueError) as e:
            renderer.render(HI)
        assert set(str(e.value)) == {"x"} and len(str(e.value)) == ERROR_CHARS
    finally:
        renderer.close()
    renderer = ChatRenderer("{{ 'y' * 4000 }}", {}, max_chars=4096)
    try:
        assert renderer.render(HI) == "y" * 4000
        bound, renderer.reply_bytes = renderer.reply_bytes, 1000   # as if it replied too much
        with pytest.raises(ValueError, match="replied more than 1000 bytes"):
            renderer.render(HI)
        renderer.reply_bytes = bound
        assert renderer.render(HI) == "y" * 4000   # the next request: a new child
    finally:
        renderer.close()
