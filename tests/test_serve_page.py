"""The chat page of `owl2 serve` (owl2_edge/serve/static/index.html), driven in a real headless
Chromium through Playwright against the server's app on the tiny model (conftest's start_server):

- a picture and a question give a streamed answer, with its timings under it; the picture is
  read ahead as soon as it is picked (/v1/warm), so the question finds its cells; the follow-up
  is sent with the history, and the server's KV cache serves the earlier turn (cached positions);
- both answers are what the Python API answers greedily for the same conversation;
- the server's error message is shown (a wrong API key), and the key field then works;
- Stop aborts the request and hands the page back; New chat forgets the conversation;
- the page throws no script error and loads nothing from any other origin.

Debian's chromium is used (scripts/setup.sh installs it as root); Playwright's own browser
download is not. Without chromium or playwright the tests skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium on PATH "
                                                         "(scripts/setup.sh installs it as root)")

API_KEY = "page-test-key"
MAX_TOKENS = 12
QUESTIONS = ("What color is the triangle?", "How many shapes are there?")
# Generous waits: the tiny model answers in well under a second, but the machine may be busy.
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def server(start_server):
    """`owl2 serve`'s app on the tiny model (tests/conftest.py), with an API key; its URL."""
    with start_server(api_key=API_KEY) as served:
        yield served.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The chat page, fresh (its own browser context). Every test ends by checking that the page
    threw no script error and asked nothing of any origin but the server's."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    script_errors, urls = [], []
    page.on("pageerror", lambda e: script_errors.append(str(e)))
    page.on("request", lambda r: urls.append(r.url))
    page.goto(server + "/")
    yield page
    context.close()
    assert not script_errors, script_errors
    elsewhere = [u for u in urls if not u.startswith((server + "/", "data:", "blob:"))]
    assert not elsewhere, f"the page loaded from the network: {elsewhere}"


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    from owl2_edge.tools.demo_image import sample_image
    path = tmp_path_factory.mktemp("picture") / "sample-1.png"
    sample_image().save(path)
    return path


def _ask(page, question: str):
    """Types a question, sends it and waits until its answer is over; the answer's message."""
    n = page.locator(".message.assistant").count()
    page.fill("#prompt", question)
    page.click("#send")
    message = page.locator(".message.assistant").nth(n)
    message.locator(".timings, .error").first.wait_for()
    sync_api.expect(page.locator("#send")).to_be_enabled()
    return message


def _python_answers(owl, picture: Path) -> list[str]:
    """The same conversation through the Python API, greedy, turn by turn as the page sends it."""
    messages, answers = [], []
    for i, question in enumerate(QUESTIONS):
        content = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": str(picture)}})
        messages.append({"role": "user", "content": content})
        reply = owl.create_chat_completion(messages, temperature=0, max_tokens=MAX_TOKENS)
        answers.append(reply["choices"][0]["message"]["content"])
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_page_streams_answers_with_history_and_shows_the_servers_errors(page, picture, owl):
    # A wrong key: the server refuses, and the page shows the message of its error JSON.
    page.fill("#api-key", "wrong-key")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.set_input_files("#file", str(picture))
    sync_api.expect(page.locator("#attachments img")).to_have_count(1)
    refused = _ask(page, QUESTIONS[0])
    sync_api.expect(refused.locator(".error")).not_to_be_empty()
    assert refused.locator(".answer").count() == 0

    # The right key; the picture again, the question, then a follow-up in the same conversation.
    page.fill("#api-key", API_KEY)
    with page.expect_response(lambda r: r.url.endswith("/v1/warm")) as warmed:
        page.set_input_files("#file", str(picture))  # read ahead at once (/v1/warm)
    assert warmed.value.status == 200
    sync_api.expect(page.locator("#attachments img")).to_have_count(1)
    first = _ask(page, QUESTIONS[0])
    assert first.locator(".error").count() == 0, first.locator(".error").text_content()
    sync_api.expect(page.locator("#attachments img")).to_have_count(0)
    second = _ask(page, QUESTIONS[1])
    assert second.locator(".error").count() == 0, second.locator(".error").text_content()

    shown = [m.locator(".answer").text_content() for m in (first, second)]
    assert all(shown), shown
    for m in (first, second):
        sync_api.expect(m.locator(".timings")).to_contain_text("cached")
    # The picture was read ahead when it was picked (/v1/warm): the first question found its
    # cells; the follow-up finds the whole first turn.
    first_cached = int(first.locator(".timings").get_attribute("data-cache-n"))
    assert first_cached >= owl.manifest.n_visual
    assert int(second.locator(".timings").get_attribute("data-cache-n")) > first_cached
    assert shown == _python_answers(owl, picture)
    # The key is remembered for the next visit.
    assert page.evaluate("localStorage.getItem('owl2.apiKey')") == API_KEY


def test_stop_aborts_the_request_and_new_chat_forgets_the_conversation(page):
    page.fill("#api-key", API_KEY)
    # The server would answer the tiny model's question in milliseconds: hold the request in the
    # browser instead, so the page is still waiting when Stop is pressed.
    held = []
    page.route("**/v1/chat/completions", lambda route: held.append(route))
    page.fill("#prompt", "Wait for me.")
    page.click("#send")
    sync_api.expect(page.locator("#send")).to_be_disabled()
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    sync_api.expect(page.locator("#stop")).to_be_disabled()
    sync_api.expect(page.locator(".message.assistant .timings")).to_have_text("stopped")
    assert held, "the page never sent its request"
    page.unroute("**/v1/chat/completions")

    page.click("#new-chat")
    sync_api.expect(page.locator("#messages > *")).to_have_count(0)
    # The stopped question got no answer, so it is not sent again: the history is empty.
    requests = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.method == "POST" else None)
    _ask(page, "Hello?")
    assert [len(body["messages"]) for body in requests] == [1]


def test_answers_are_stripped_as_python_strips_them(page):
    """The page sends each answer back in the history; it must be the text the server's own
    history would hold (Python's str.strip), or the next prompt misses the cached prefix. The
    tiny model does answer with such characters (\\x1e, for one)."""
    python_space = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    for text in (python_space + "a b" + python_space, "\ufeffa\ufeff", "\x1ca\x85", "  ", ""):
        assert page.evaluate("pyStrip", text) == text.strip(), repr(text)
