"""Drives the web page of a running `skillet serve` in headless Chromium
(Debian's chromium and chromium-driver, installed by
scripts/browser-env.sh): key → upload → start a job → watch it finish →
ask the tuned model beside the base model. Saves screenshots. Run by
tests/jobs_api.rs; exits non-zero with a message on the first failed
check.

    python web_page.py --url http://127.0.0.1:PORT/ --key KEY --train FILE --shots DIR
"""

import argparse
import os
import shutil
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--shots", required=True)
    a = ap.parse_args()
    os.makedirs(a.shots, exist_ok=True)

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    try:
        run(driver, a)
    except Exception:
        driver.save_screenshot(os.path.join(a.shots, "failure.png"))
        raise
    finally:
        driver.quit()


def run(driver, a):
    find = driver.find_element
    wait = lambda secs, cond, what: WebDriverWait(driver, secs, poll_frequency=0.2).until(  # noqa: E731
        lambda d: cond(), message=what
    )
    shot = lambda name: driver.save_screenshot(os.path.join(a.shots, name))  # noqa: E731

    driver.get(a.url)
    check(driver.title == "Skillet", "the page loads without a key")
    find(By.ID, "key").send_keys(a.key)
    find(By.ID, "save-key").click()

    # Upload a file and start a job.
    find(By.CSS_SELECTOR, "nav button[data-tab=new]").click()
    find(By.ID, "upload-file").send_keys(os.path.abspath(a.train))
    find(By.ID, "upload").click()
    wait(30, lambda: "processed" in find(By.ID, "upload-result").text, "the upload is processed")
    check(True, f"upload: {find(By.ID, 'upload-result').text}")
    wait(10, lambda: len(Select(find(By.ID, "new-model")).options) > 0, "models are listed")
    for field, value in (("new-epochs", "2"), ("new-lr", "10"), ("new-suffix", "web")):
        find(By.ID, field).clear()
        find(By.ID, field).send_keys(value)
    find(By.ID, "new-skillet").send_keys(
        '{"data": {"max_seq_len": 48, "validation_fraction": 0.2}, "eval": {"generate": false}}'
    )
    shot("new-job.png")
    find(By.ID, "create-job").click()

    # The job page: it finishes, with its curve, checkpoints and report.
    wait(30, lambda: find(By.ID, "job-title").text.startswith("ftjob-"), "the job page opens")
    shot("job-started.png")
    wait(180, lambda: find(By.ID, "job-status").text == "succeeded", "the job succeeds")
    wait(20, lambda: find(By.ID, "report-text").text.strip() != "", "the report is shown")
    wait(20, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")) == 2, "two checkpoints")
    shot("job-finished.png")
    model = find(By.ID, "job-model").text
    check(model.startswith("ft:") and model.endswith(find(By.ID, "job-title").text), f"fine-tuned model {model}")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#loss-chart polyline.series-train")) == 1, "a training curve")
    check(len(driver.find_elements(By.CSS_SELECTOR, "#loss-chart .series-validation")) == 1, "a validation curve")
    report = find(By.ID, "report-text").text
    check("loss" in report.lower(), "the before/after report is shown")
    check(driver.execute_script("return document.getElementById('report-plot').naturalWidth") > 0, "its plot loads")
    rows = driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
    check(any("succeeded" in r.text and model in r.text for r in rows), "the jobs list shows it succeeded")

    # Files with their validation results.
    find(By.CSS_SELECTOR, "nav button[data-tab=files]").click()
    wait(10, lambda: "processed" in find(By.ID, "files").text, "files are listed as processed")
    shot("files.png")

    # The playground: base and tuned model side by side.
    find(By.CSS_SELECTOR, "nav button[data-tab=play]").click()
    wait(10, lambda: model in [o.text for o in Select(find(By.ID, "play-right")).options], "the tuned model is offered")
    Select(find(By.ID, "play-right")).select_by_visible_text(model)
    find(By.ID, "play-prompt").send_keys("add 3 and 3")
    find(By.ID, "play-send").click()
    content = lambda side: driver.execute_script(  # noqa: E731
        "return document.getElementById(arguments[0]).textContent", side
    )
    done = lambda side: content(side) not in ("", "…")  # noqa: E731
    wait(60, lambda: done("play-left-out") and done("play-right-out"), "both models answer")
    shot("playground.png")
    for side in ("play-left-out", "play-right-out"):
        check(not content(side).startswith("error"), f"{side}: {content(side)!r}")
    check(find(By.ID, "msg").text == "", f"no error on the page: {find(By.ID, 'msg').text}")
    print("all checks passed")


if __name__ == "__main__":
    main()
