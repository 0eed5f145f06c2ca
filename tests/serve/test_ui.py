"""The web demo in headless Chromium: attach images (picker, paste, drop), Enter sends and Shift+Enter breaks the
line, the answer streams in and equals the API's, Stop cancels the request on the server, the log follows the
answer, a file that is no image becomes an error bubble (never a broken image), the model's directory is shown,
and the server writes one access line per request. Screenshots go to the test's tmp dir."""
from __future__ import annotations

import base64
import logging
import shutil

import httpx
import openai
import pytest
import torch

import mm
from serve_helpers import MODEL, data_url, image_bytes, serving, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no Chromium here (apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--window-size=900,700", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture()
def access_lines():
    """The server's access log lines (the real ``mm.serve.access`` logger, captured in a list)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("mm.serve.access")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A tiny model that never ends an answer on its own (it babbles " he" / " wor" until max_tokens)."""
    torch.manual_seed(0)
    model = mm.build(mm.ModelConfig(encoder="tiny-vit", adapter="mlp", llm="tiny-llama"))
    he, wor = model.tokenizer.convert_tokens_to_ids(["Ġhe", "Ġwor"])
    with torch.no_grad():
        model.llm.model.norm.weight.zero_()[0] = 1.0
        model.llm.lm_head.weight.zero_()
        model.llm.lm_head.weight[he, 0], model.llm.lm_head.weight[wor, 0] = 10.0, -10.0
    directory = tmp_path_factory.mktemp("talker") / "babbler-v1"
    model.save(directory)
    return directory


# Counts how many times the log changed: more than a few times for one answer means it streamed in.
WATCH = """
window.updates = 0;
new MutationObserver(() => { window.updates += 1; })
  .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""
# Hands the page a file as the browser does for a paste or a drop: a real DataTransfer with a File in it.
HAND_OVER = """
const [b64, name, type, how] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, {type}));
const event = how === "paste" ? new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true})
                              : new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true});
document.getElementById(how === "paste" ? "prompt" : "log").dispatchEvent(event);
"""


def hand_over(driver, raw: bytes, name: str, mime: str, how: str) -> None:
    driver.execute_script(HAND_OVER, base64.b64encode(raw).decode(), name, mime, how)


def done_turns(driver) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, ".turn[data-done='true']"))


def ask(driver, text, expect_error=False):
    """Type ``text`` and press Enter; return the answer once it is complete."""
    before = done_turns(driver)
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, 120).until(lambda d: done_turns(d) > before)
    answer = driver.find_elements(By.CSS_SELECTOR, ".turn[data-done]")[-1]
    assert ("error" in answer.get_attribute("class")) == expect_error, answer.text
    return answer.find_element(By.TAG_NAME, "span").get_attribute("textContent")


def no_broken_images(driver) -> bool:
    return driver.execute_script(
        "return [...document.images].every((img) => img.complete && img.naturalWidth > 0)")


def test_attach_ask_stream_and_follow_up(tiny_model_dir, tmp_path, browser, access_lines):
    picture = tmp_path / "red.png"
    picture.write_bytes(image_bytes("red", (48, 32)))
    with serving(tiny_model_dir, ui=True, model_path=str(tiny_model_dir)) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        assert browser.find_element(By.ID, "model-dir").text == tiny_model_dir.name  # the name, never the path
        assert str(tiny_model_dir.parent) not in browser.page_source
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("12")
        browser.find_element(By.ID, "image").send_keys(str(picture))
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))

        # Shift+Enter breaks the line and sends nothing
        box = browser.find_element(By.ID, "prompt")
        box.send_keys("line one")
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        box.send_keys("line two")
        assert box.get_attribute("value") == "line one\nline two"
        assert not browser.find_elements(By.CSS_SELECTOR, ".turn")

        browser.execute_script(WATCH)
        first = ask(browser, "what color is it?")
        assert browser.execute_script("return window.updates") > 3  # user turn + several answer updates
        browser.save_screenshot(str(tmp_path / "ui-first-answer.png"))

        # The page's answer is the API's greedy answer for the same image and question ...
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        history = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(picture.read_bytes())}},
            {"type": "text", "text": "what color is it?"}]}]
        expected = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
        assert first == expected.choices[0].message.content and first

        # ... and the follow-up is answered with the whole conversation as context (multi-turn).
        second = ask(browser, "and the shape?")
        history += [{"role": "assistant", "content": expected.choices[0].message.content},
                    {"role": "user", "content": [{"type": "text", "text": "and the shape?"}]}]
        follow_up = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
        assert second == follow_up.choices[0].message.content
        assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.user img")) == 1
        assert client.models.list().data[0].model_extra["root"] == tiny_model_dir.name
        browser.save_screenshot(str(tmp_path / "ui-follow-up.png"))
        assert (tmp_path / "ui-follow-up.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # one access line per request: the page, /health, the two streamed answers, the API calls
    requests = [line.split('"')[1] for line in access_lines]
    assert requests.count("GET /") == 1 and requests.count("GET /health") >= 1
    assert requests.count("POST /v1/chat/completions") == 4 and requests.count("GET /v1/models") == 1
    for line in access_lines:
        client_part, request, rest = line.split('"')
        status, duration, unit = rest.split()
        assert client_part.startswith("127.0.0.1:") and status == "200" and float(duration) >= 0 and unit == "ms"
        assert "what color" not in line  # no request body in the log


def test_paste_drop_stop_scroll_and_error_bubbles(talker, tmp_path, browser, access_lines):
    red, blue = image_bytes("red", (40, 30)), image_bytes("blue", (30, 40))
    with serving(talker, ui=True, model_path=str(talker), max_images=2) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model-dir").text == "babbler-v1")

        # paste one image, drop another; a text file and a corrupt PNG become error bubbles, not attachments
        hand_over(browser, red, "red.png", "image/png", "paste")
        hand_over(browser, blue, "blue.png", "image/png", "drop")
        hand_over(browser, b"just words", "notes.txt", "text/plain", "drop")
        hand_over(browser, b"\x89PNG\r\n\x1a\n broken", "broken.png", "image/png", "paste")
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".turn.error")) == 2, 30, "two error bubbles")
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 2)
        errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".turn.error")]
        assert "notes.txt is not an image (text/plain)" in errors[0]
        assert "broken.png is not an image this browser can decode" in errors[1]
        assert no_broken_images(browser)
        browser.save_screenshot(str(tmp_path / "ui-attachments.png"))

        # Stop: the stream is cancelled on the server and the page keeps what was shown
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("1500")
        box = browser.find_element(By.ID, "prompt")
        box.send_keys("describe both", Keys.ENTER)
        WebDriverWait(browser, 60).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant span")[-1].text.split()) > 20)
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn[data-stopped='true']"))
        stopped = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant span")[-1].text
        assert 20 < len(stopped.split()) < 1500 and set(stopped.split()) <= {"he", "wor"}
        assert browser.find_element(By.ID, "status").text == "stopped"
        assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.user img")) == 2 and no_broken_images(browser)
        # the server stopped generating: far fewer than the 1500 tokens asked for
        health = wait_for(lambda: (h := httpx.get(url + "/health").json())["running"] == 0 and h, 30, "an idle engine")
        assert health["completed"] + health["cancelled"] == 1 and health["generated_tokens"] < 1000, health
        browser.save_screenshot(str(tmp_path / "ui-stopped.png"))

        # the session goes on, and the log follows the answers down
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("300")
        ask(browser, "more")
        ask(browser, "and more")
        log = browser.find_element(By.ID, "log")
        height, top, client_height = (int(log.get_property(p)) for p in ("scrollHeight", "scrollTop", "clientHeight"))
        assert height > client_height + 100, "the log should overflow for this check"
        assert top + client_height >= height - 2, (top, client_height, height)

        # a request the server refuses is an error bubble naming why
        hand_over(browser, red, "a.png", "image/png", "paste")
        hand_over(browser, red, "b.png", "image/png", "paste")
        hand_over(browser, blue, "c.png", "image/png", "drop")
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 3)
        refused = ask(browser, "three images", expect_error=True)
        assert "at most 2" in refused
        browser.save_screenshot(str(tmp_path / "ui-refused.png"))

    streamed = [line for line in access_lines if '"POST /v1/chat/completions"' in line]
    assert len(streamed) == 4 and streamed[-1].split('"')[2].split()[0] == "400"
