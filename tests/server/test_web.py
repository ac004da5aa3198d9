"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
open it, send a message, watch the answer stream in, stop one, take a screenshot."""

import os
import shutil
import time
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


LAYOUT = """
const box = (el) => { const r = el.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, left: r.left,
                                                                    right: r.right, width: r.width}; };
const list = document.getElementById('messages');
const msgs = list.querySelectorAll('.msg');
return {page: document.scrollingElement.scrollHeight, scrollY: window.scrollY, width: window.innerWidth,
        height: window.innerHeight, header: box(document.querySelector('header')),
        prompt: box(document.getElementById('prompt')), send: box(document.getElementById('send')),
        list: box(list), listScroll: list.scrollHeight, listClient: list.clientHeight,
        last: msgs.length ? box(msgs[msgs.length - 1]) : null,
        settings: getComputedStyle(document.getElementById('settings')).display};
"""


@pytest.fixture(scope="module")
def demo():
    """The bundled demo model (256-token context) and its tokenizer, as `grok1 serve` loads them."""
    from grok1.cli.common import DEFAULT_CHECKPOINT
    from grok1.config import resolve_config
    from grok1.tokenizer import Tokenizer
    from grok1.weights.load import load_model

    model = load_model(DEFAULT_CHECKPOINT, resolve_config(DEFAULT_CHECKPOINT), "cpu", None, pack=True)
    return model, Tokenizer(DEFAULT_CHECKPOINT / "tokenizer.model")


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_layout_keeps_header_and_input_in_view_at_desktop_and_phone_sizes(demo, browser, tmp_path, width, height):
    """A long conversation with the demo model at the default answer length: the message list scrolls, the
    page does not; the header, the input and the latest message stay in view; older turns are left out of
    the request when the 256-token context fills; a stopped answer is marked. Screenshots at both sizes."""
    from selenium.webdriver.common.by import By

    model, tok = demo
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700})
    with live_server(model, tok, max_batch=2, max_seq_len=256, name="grok-1-mini") as (url, engine):
        browser.get(url + "/")
        find = browser.find_element
        wait_for(lambda: "context 256" in find(By.ID, "model").text, what="the model and its context")
        phone = width < 700
        if phone:
            assert browser.execute_script(LAYOUT)["settings"] == "none"  # settings fold away on a phone
            find(By.ID, "toggle").click()
        find(By.ID, "temperature").clear()
        find(By.ID, "temperature").send_keys("0")
        if phone:
            find(By.ID, "toggle").click()
        for i, question in enumerate(["Who is Mr Darcy?", "What does Elizabeth think of him?",
                                      "And what happens at the ball?", "Tell me about Jane and Mr Bingley.",
                                      "How does the story end?"]):
            find(By.ID, "prompt").send_keys(question)
            find(By.ID, "send").click()
            wait_for(lambda: find(By.ID, "status").text in ("ready", "error"), timeout=120,
                     what=f"answer {i + 1}")
            assert find(By.ID, "status").text == "ready", browser.find_elements(By.CSS_SELECTOR, ".msg.error")[0].text
        # The context filled: the oldest turns were left out of the request, and every answer came.
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.note")
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        # A stopped answer is marked as such. Each step is made slow first (the runner's own method, wrapped in
        # this instance), so the answer cannot finish before the click however fast the kernels are.
        run = engine.runner.run
        engine.runner.run = lambda step: (time.sleep(0.05), run(step))[1]
        find(By.ID, "prompt").send_keys("Tell me the whole story again, slowly.")
        find(By.ID, "send").click()
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")) == 6 and
                 browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].text, what="streaming")
        find(By.ID, "stop").click()
        wait_for(lambda: find(By.ID, "status").text == "stopped", what="the stop")
        last_answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert "stopped" in last_answer.get_attribute("class") and "STOPPED" in last_answer.text.upper()

        box = browser.execute_script(LAYOUT)
        assert box["width"] == width and box["height"] == height
        assert box["listScroll"] > box["listClient"]  # the conversation is longer than the list...
        assert box["page"] <= height and box["scrollY"] == 0  # ...which scrolls, while the page does not
        assert box["header"]["top"] == 0 and box["header"]["bottom"] <= 60
        assert 0 < box["prompt"]["top"] and box["prompt"]["bottom"] <= height
        assert box["prompt"]["width"] >= (0.5 * width if phone else 600)  # not squeezed by the settings
        assert box["send"]["right"] <= width
        # The latest message is scrolled into view inside the list.
        assert box["list"]["top"] <= box["last"]["top"] < box["list"]["bottom"]
        assert box["last"]["bottom"] <= box["list"]["bottom"] + 1

        shot_dir = Path(os.environ.get("GROK1_SCREENSHOT_DIR", tmp_path))
        shot = shot_dir / f"web-chat-{width}x{height}.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        print(f"screenshot: {shot}")
