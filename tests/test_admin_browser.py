"""The admin dashboard in a real browser (issue 16): headless Debian Chromium driven by
Selenium through chromedriver, against the real server with the real model. Log in; open
eu-de; add a redaction rule with a backreference and see the validation error; fix it; try
it; publish; a chat request for eu-de gets the redaction and carries the new policy sha256;
roll back and the next request does not. A screenshot of each page lands in the test's
temporary folder (printed at the end).

CI needs `chromium` and `chromium-driver` (scripts/install_system_deps.sh installs them) and
the `selenium` test extra; without them the test is skipped with a reason."""

from __future__ import annotations

import json
import tempfile

import pytest
from serve_fixtures import serving
from test_admin_api import TOKEN, admin_bundle, chat, eu_de_doc  # noqa: F401 - admin_bundle: fixture

pytestmark = [pytest.mark.slow, pytest.mark.requires_binary("chromium", "chromedriver")]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (pip install selenium)")

from conftest import find_binary  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = find_binary("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-profile-', dir=tmp_path)}",
    ):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=find_binary("chromedriver"))
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def type_into(drv, element_id: str, text: str) -> None:
    el = drv.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(text)


def test_admin_dashboard_in_chromium(runs, admin_bundle, browser, tmp_path):  # noqa: F811
    bundle_dir, tok = admin_bundle
    shots = tmp_path / "screenshots"
    shots.mkdir()
    drv = browser
    wait = WebDriverWait(drv, 30)
    logs = []

    def shot(name: str) -> None:
        drv.save_screenshot(str(shots / f"{len(list(shots.iterdir())) + 1:02d}-{name}.png"))

    with serving(
        runs["sft"], policy=bundle_dir / "policy_bundle.json", audit_log=tmp_path / "audit.jsonl", admin_token_file=tok
    ) as s:
        before = chat(s, "eu-de")["aion"]
        # log in
        drv.get(s.url + "/admin/")
        wait.until(lambda d: d.find_element(By.ID, "login-form"))
        shot("login")
        type_into(drv, "token", TOKEN)
        drv.find_element(By.ID, "login-button").click()
        wait.until(lambda d: d.find_elements(By.ID, "tree"))
        assert "unrestricted" in drv.find_element(By.ID, "tree").text
        shot("jurisdictions")
        # open eu-de
        drv.find_element(By.LINK_TEXT, "eu-de").click()
        wait.until(lambda d: d.find_element(By.ID, "validation").get_attribute("data-state") == "valid")
        shot("policy-eu-de")
        # add a redaction rule with a backreference: the validator says where and why
        doc = eu_de_doc()
        bad = {
            **doc,
            "version": "1.2.0",
            "rules": doc["rules"]
            + [{"id": "vowels", "action": "redact", "patterns": ["([aeiou])\\1"], "replacement": "*"}],
        }
        type_into(drv, "editor", json.dumps(bad, indent=1))
        wait.until(lambda d: d.find_element(By.ID, "validation").get_attribute("data-state") == "invalid")
        msg = drv.find_element(By.ID, "validation").text
        assert "$.rules[2].patterns[0]" in msg and "backreference" in msg, msg
        shot("validation-error")
        # fix it
        good = {
            **bad,
            "rules": doc["rules"] + [{"id": "vowels", "action": "redact", "patterns": ["[aeiou]"], "replacement": "*"}],
        }
        type_into(drv, "editor", json.dumps(good, indent=1))
        wait.until(lambda d: d.find_element(By.ID, "validation").get_attribute("data-state") == "valid")
        # try the draft on a text, side by side
        type_into(drv, "try-text", "write to anna@example.de")
        drv.find_element(By.ID, "try-button").click()
        wait.until(lambda d: d.find_element(By.ID, "try-enforced").text)
        enforced = drv.find_element(By.ID, "try-enforced").text
        assert "anna@example.de" not in enforced and enforced.startswith("wr*t* t* [")  # email, then vowels
        assert "eu-email" in drv.find_element(By.ID, "try-fired").text
        assert drv.find_elements(By.CSS_SELECTOR, "#try-raw mark.redact")
        shot("try-it")
        # publish
        drv.find_element(By.ID, "publish").click()
        wait.until(lambda d: d.find_element(By.ID, "publish-result").get_attribute("data-state") == "published")
        published_sha = s.service.policies["eu-de"].sha256
        wait.until(lambda d: "v1.2.0" in d.find_element(By.ID, "jurisdiction").text)
        shot("published")
        after = chat(s, "eu-de")["aion"]
        logs.append(after)
        assert after["policy_sha256"] == published_sha != before["policy_sha256"]
        assert after["redactions"] > 0
        # roll back to 1.1.0 (itself a new version)
        drv.find_element(By.CSS_SELECTOR, 'button.rollback[data-version="1.1.0"]').click()
        wait.until(lambda d: "v1.2.1" in d.find_element(By.ID, "jurisdiction").text)
        # diff between the two versions
        drv.find_element(By.CSS_SELECTOR, 'input[name="diff-a"][value="1.1.0"]').click()
        drv.find_element(By.CSS_SELECTOR, 'input[name="diff-b"][value="1.2.0"]').click()
        drv.find_element(By.ID, "diff-button").click()
        wait.until(lambda d: "vowels" in d.find_element(By.ID, "diff").text)
        shot("history-diff")
        rolled = chat(s, "eu-de")["aion"]
        assert rolled["policy_sha256"] == s.service.policies["eu-de"].sha256 != after["policy_sha256"]
        assert rolled["redactions"] == 0
        # audit page: chain verified, admin actions listed with who
        drv.get(s.url + "/admin/audit")
        wait.until(lambda d: "chain verified" in d.find_element(By.ID, "chain").text)
        table = drv.find_element(By.ID, "audit").text
        assert "publish" in table and "rollback" in table and "alice" in table
        shot("audit")
    print(f"screenshots: {shots}")
    assert len(list(shots.glob("*.png"))) == 8
