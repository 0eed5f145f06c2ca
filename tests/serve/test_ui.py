"""The web demo in headless Chromium: upload an image, ask, watch the answer stream in, ask a follow-up."""
from __future__ import annotations

import shutil

import openai
import pytest

from serve_helpers import MODEL, data_url, image_bytes, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no Chromium here (apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# Counts how many times the newest answer's text changed: more than once means it streamed in.
WATCH = """
window.updates = 0;
new MutationObserver(() => { window.updates += 1; })
  .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


def ask(driver, text):
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    count = len(driver.find_elements(By.CSS_SELECTOR, ".turn.assistant, .turn.error"))
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn[data-done='true']")) >= count)
    answer = driver.find_elements(By.CSS_SELECTOR, ".turn[data-done]")[-1]
    assert "error" not in answer.get_attribute("class"), answer.text
    return answer.find_element(By.TAG_NAME, "span").get_attribute("textContent")


def test_upload_ask_stream_and_follow_up(tiny_model_dir, tmp_path, browser):
    picture = tmp_path / "red.png"
    picture.write_bytes(image_bytes("red", (48, 32)))
    with serving(tiny_model_dir, ui=True) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("12")
        browser.find_element(By.ID, "image").send_keys(str(picture))
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        browser.execute_script(WATCH)
        first = ask(browser, "what color is it?")
        assert browser.execute_script("return window.updates") > 3  # user turn + several answer updates

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
