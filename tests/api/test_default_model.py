"""The real default model (SmolLM2-135M-Instruct) behind the API and the web page, in a real browser.

The browser test drives Debian's chromium through chromedriver (installed by `scripts/setup.sh
--tests`), headless and with background networking off, against the server on 127.0.0.1. It keeps a
screenshot in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.api.conftest import running

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FRANCE = "What is the capital of France?"
STORY = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module")
def server(default_text_model):
    with running(default_text_model, parallel=1) as s:
        yield s


def ask(server, model, content: str, **options):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return c.chat.completions.create(model=model.name, messages=[{"role": "user", "content": content}], **options)


def test_real_answer(server, default_text_model):
    r = ask(server, default_text_model, FRANCE, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the model ended its turn (<|im_end|>)


def test_seed_repeats_at_default_temperature(server, default_text_model):
    answers = [ask(server, default_text_model, "Name a colour.", max_tokens=12, seed=5).choices[0].message.content
               for _ in range(2)]
    assert answers[0] == answers[1]


# -- the web page in a real browser --------------------------------------------------------------------
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


def set_field(driver, field_id: str, value) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, field_id)
    element.clear()
    element.send_keys(str(value))


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    set_field(driver, "prompt", text)
    driver.find_element(By.ID, "send").click()


def answers(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def test_page_streams_the_greedy_answer_and_stops(server, default_text_model, browser):
    from selenium.webdriver.common.by import By

    expected = ask(server, default_text_model, FRANCE, temperature=0, max_tokens=64).choices[0].message.content
    browser.get(server.url + "/")
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "ready", 30)
    wait(browser, lambda d: default_text_model.name in d.find_element(By.ID, "model-name").text, 30)
    model_panel = browser.find_element(By.ID, "model-info").text
    assert "Q8_0" in model_panel and "fragments" in model_panel and "llama" in model_panel

    set_field(browser, "temperature", 0)
    set_field(browser, "max_tokens", 64)
    send(browser, FRANCE)
    wait(browser, lambda d: answers(d) and answers(d)[-1].get_attribute("data-state") == "done")
    assert answers(browser)[-1].text == expected.strip()
    assert "answer" in browser.find_element(By.ID, "stats").text  # the last chunk's timings were shown

    browser.execute_script("document.querySelector('aside').scrollTop = 0")  # the model panel in view
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))

    # A long answer, stopped from the page: the fetch is aborted and the server stops generating.
    set_field(browser, "max_tokens", 1000)
    send(browser, STORY)
    wait(browser, lambda d: len(answers(d)) == 2 and len(answers(d)[-1].text) > 20)
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda d: answers(d)[-1].get_attribute("data-state") == "done", 10)
    assert "(stopped)" in answers(browser)[-1].text
    assert wait(browser, lambda d: server_health(server)["running"] == 0, 10)


def server_health(server) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        return json.load(r)

