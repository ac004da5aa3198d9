"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
open it, send a message, watch the answer stream in, stop one, take a screenshot."""

import os
import shutil
from pathlib import Path

import pytest
from serving import live_server, load_tokenizer, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


WATCH = """
window.answerStates = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant .content');
  if (answers.length) window.answerStates.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,760", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_page_streams_an_answer_and_stops(golden_model, tok, browser, tmp_path):
    from selenium.webdriver.common.by import By

    with live_server(golden_model, tok, max_batch=2, max_seq_len=1024) as (url, engine):
        browser.get(url + "/")
        find = browser.find_element
        wait_for(lambda: "tiny" in find(By.ID, "model").text, what="the model name from /v1/models")
        find(By.ID, "temperature").clear()
        find(By.ID, "temperature").send_keys("0")
        find(By.ID, "max_tokens").clear()
        find(By.ID, "max_tokens").send_keys("24")
        browser.execute_script(WATCH)  # records every state of the answer as the page updates it
        find(By.ID, "prompt").send_keys("Hello, who are you?")
        find(By.ID, "send").click()

        def answer():
            return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].text

        wait_for(lambda: find(By.ID, "status").text == "ready", timeout=120, what="the answer to finish")
        first = answer()
        assert first and find(By.CSS_SELECTOR, ".msg.user .content").text == "Hello, who are you?"
        # Streamed: the answer grew in several steps, each a prefix of the final text.
        states = [t for t in dict.fromkeys(browser.execute_script("return window.answerStates")) if t]
        assert len(states) >= 3 and all(first.startswith(t.strip()) for t in states), states

        # A long answer, stopped with the button: the request is cancelled on the server.
        find(By.ID, "max_tokens").clear()
        find(By.ID, "max_tokens").send_keys("900")
        find(By.ID, "prompt").send_keys("Tell me everything.")
        find(By.ID, "send").click()
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2 and answer(),
                 timeout=60, what="the second answer to start")
        find(By.ID, "stop").click()
        wait_for(lambda: find(By.ID, "status").text == "stopped", what="the page to stop")
        wait_for(lambda: engine.stats()["finished"].get("cancelled", 0) >= 1, what="the server to cancel")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2  # the conversation is kept

        shot = Path(os.environ.get("GROK1_SCREENSHOT", tmp_path / "web-chat.png"))
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        print(f"screenshot: {shot}")
