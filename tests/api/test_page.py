"""The chat page in a real browser: Debian's chromium through chromedriver (installed by
`scripts/setup.sh --tests`), headless, background networking off, against the server on 127.0.0.1.
A screenshot is kept in tests/artifacts/ (git-ignored; docs/chat-page.png is a copy of one).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from api.loading import LoadingModel
from tests.api.conftest import running

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FRANCE = "What is the capital of France?"
STORY = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: run 'bash scripts/setup.sh --tests' (it installs chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--no-first-run", "--no-default-browser-check", "--metrics-recording-only",
                "--disable-features=Translate,OptimizationHints,MediaRouter", "--window-size=1280,800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def set_field(driver, field_id: str, value) -> None:
    element = by_id(driver, field_id)
    element.clear()
    element.send_keys(str(value))


def send(driver, text: str) -> None:
    set_field(driver, "prompt", text)
    by_id(driver, "send").click()


def answers(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def health(server) -> dict:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def test_page_streams_the_greedy_answer_and_stops(default_text_model, browser):
    with running(default_text_model, parallel=1) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        expected = c.chat.completions.create(model=default_text_model.name, temperature=0, max_tokens=64,
                                             messages=[{"role": "user", "content": FRANCE}]).choices[0].message.content
        browser.get(server.url + "/")
        wait(browser, lambda d: by_id(d, "status").text == "ready", 30)
        wait(browser, lambda d: default_text_model.name in by_id(d, "model-name").text, 30)
        model_panel = by_id(browser, "model-info").text
        assert "Q8_0" in model_panel and "fragments" in model_panel and "llama" in model_panel

        set_field(browser, "temperature", 0)
        set_field(browser, "max_tokens", 64)
        send(browser, FRANCE)
        wait(browser, lambda d: answers(d) and answers(d)[-1].get_attribute("data-state") == "done")
        assert answers(browser)[-1].text == expected.strip()
        assert "answer" in by_id(browser, "stats").text  # the last chunk's timings were shown

        # The second turn sends the whole conversation; the slot's cache already holds the first.
        send(browser, "And of Italy?")
        wait(browser, lambda d: len(answers(d)) == 2 and answers(d)[-1].get_attribute("data-state") == "done")
        assert "Rome" in answers(browser)[-1].text
        assert "from the cache" in by_id(browser, "stats").text
        browser.execute_script("document.querySelector('aside').scrollTop = 0")  # the model panel in view
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))

        # A long answer, stopped from the page: the fetch is aborted and the server stops generating.
        set_field(browser, "max_tokens", 1000)
        send(browser, STORY)
        wait(browser, lambda d: len(answers(d)) == 3 and len(answers(d)[-1].text) > 20)
        by_id(browser, "stop").click()
        wait(browser, lambda d: answers(d)[-1].get_attribute("data-state") == "done", 10)
        assert "(stopped)" in answers(browser)[-1].text
        assert wait(browser, lambda d: health(server)["running"] == 0, 10)


def test_a_failed_turn_leaves_the_conversation(default_text_model, browser):
    """A request the server refuses (max_tokens 0): the error is shown, the turn is not kept (it
    was, and went again with every later message), its text is back in the box, and the next
    message is answered as the first of the conversation."""
    from selenium.webdriver.common.by import By

    with running(default_text_model, parallel=1) as server:
        browser.get(server.url + "/")
        wait(browser, lambda d: by_id(d, "status").text == "ready", 30)
        set_field(browser, "temperature", 0)
        set_field(browser, "max_tokens", 0)
        send(browser, FRANCE)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "max_tokens" in browser.find_elements(By.CSS_SELECTOR, ".msg.error")[-1].text
        wait(browser, lambda d: by_id(d, "send").is_enabled(), 10)
        assert browser.execute_script("return conversation.length") == 0
        assert by_id(browser, "prompt").get_attribute("value") == FRANCE
        assert not answers(browser)

        set_field(browser, "max_tokens", 8)
        send(browser, "Hello")
        wait(browser, lambda d: answers(d) and answers(d)[-1].get_attribute("data-state") == "done")
        assert browser.execute_script("return conversation.map(m => m.content)")[0] == "Hello"
        assert browser.execute_script("return conversation.length") == 2


def test_page_shows_loading_progress_then_the_route(factory_text_model, browser):
    """While loading: the stage and a progress bar; once ready: the model and a distributed route."""
    route = [{"node": "ws://127.0.0.1:9101", "blocks": "0-0", "ms_per_token": 1.5},
             {"node": "ws://127.0.0.1:9102", "blocks": "1-1", "ms_per_token": 2.25}]
    routed = replace(factory_text_model, info={**factory_text_model.info, "route": route})
    go = threading.Event()

    def load(progress):
        progress("fetch 12 fragments", 3, 12)
        assert go.wait(60)
        return routed

    with running(LoadingModel(load)) as server:
        browser.get(server.url + "/")
        wait(browser, lambda d: "fetch 12 fragments" in by_id(d, "loading-stage").text, 30)
        assert by_id(browser, "status").text == "loading"
        assert by_id(browser, "loading-bar").get_attribute("value") == "3"
        assert "3 of 12 (25%)" in by_id(browser, "loading-detail").text
        go.set()
        wait(browser, lambda d: by_id(d, "status").text == "ready", 30)
        assert not by_id(browser, "loading").is_displayed()
        wait(browser, lambda d: by_id(d, "route-panel").is_displayed(), 10)
        rows = by_id(browser, "route").text.splitlines()
        assert rows[0].split() == ["node", "blocks", "ms_per_token"]
        assert rows[2].split() == ["ws://127.0.0.1:9102", "1-1", "2.25"]


def test_numbers_ime_and_a_server_that_goes_away(factory_text_model, browser):
    """From a hostile review: "1e3" in max_tokens was sent as 1 (parseInt); the Enter that ends an
    IME composition sent the half-typed message; the badge said "ready" long after the server died."""
    with running(factory_text_model, parallel=1) as server:
        browser.get(server.url + "/")
        wait(browser, lambda d: by_id(d, "status").text == "ready", 30)
        set_field(browser, "max_tokens", "1e3")
        set_field(browser, "top_k", "7")
        body = browser.execute_script("return requestBody()")
        assert body["max_tokens"] == 1000 and body["top_k"] == 7
        set_field(browser, "prompt", "にほん")
        browser.execute_script("document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown', "
                               "{key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))")
        time.sleep(0.5)
        assert not answers(browser) and by_id(browser, "prompt").get_attribute("value") == "にほん"
    # the server is gone: the page's health poll notices
    wait(browser, lambda d: by_id(d, "status").text != "ready", 20)
    assert "unreachable" in by_id(browser, "status").text


@contextmanager
def framing_site(target: str):
    """Another origin on loopback whose page shows ``target`` in an iframe."""
    html = f"<!doctype html><iframe id=f width=600 height=400 src='{target}'></iframe>".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}/"
    finally:
        site.shutdown()
        site.server_close()


def framed(driver) -> list:
    """The framed document's URL and whether it holds the chat page's prompt, once it has loaded."""
    driver.switch_to.frame(by_id(driver, "f"))
    try:
        return driver.execute_script("return document.readyState == 'complete' && document.URL != 'about:blank' "
                                     "&& [document.URL, !!document.getElementById('prompt')]")
    finally:
        driver.switch_to.default_content()


def test_no_other_site_can_frame_the_page(factory_text_model, browser):
    """From a hostile review: another site could show the page in an invisible frame and have a
    user's clicks land on Send. The page refuses frames (X-Frame-Options, CSP frame-ancestors); the
    same site framing /health, which sends neither, shows the harness sees a framed page load."""
    with running(factory_text_model, parallel=1) as server:
        with framing_site(server.url + "/health") as site:
            browser.get(site)
            url, _ = wait(browser, framed, 30)
            assert url == server.url + "/health"
        with framing_site(server.url + "/") as site:
            browser.get(site)
            url, has_prompt = wait(browser, framed, 30)
            assert url.startswith("chrome-error://") and not has_prompt
        browser.get(server.url + "/")  # the page itself still runs under its policy
        wait(browser, lambda d: by_id(d, "status").text == "ready", 30)
