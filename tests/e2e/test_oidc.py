"""Single sign-on with OpenID Connect, in the browser, through a real OpenID provider.

The provider is panva's certified `oidc-provider` for Node.js (tests/oidc, installed with
`npm ci`), with its own login and consent pages and one client that must use PKCE. Its
accounts: olivia in `beckon-ops` (mapped to operator), victor in `staff` (mapped to viewer)
and mallory in `contractors` (mapped to nothing). A second `beckon up` signs in through it.

Olivia signs in, is shown as an operator and has the wake-up controls; victor is a viewer
without them. Mallory is refused on the login page, and so are a sign-in cancelled at the
provider and a callback whose state this browser never started. Local users keep logging in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from conftest import REPO_ROOT, _reader, die_with_parent, free_port, start_beckon, stop
from test_console_ui import go, visible, wait

PROVIDER_DIR = REPO_ROOT / "tests" / "oidc"
PROVIDER_START_TIMEOUT = 20.0
CLIENT_ID = "beckon-console"
CLIENT_SECRET = "a client secret for the e2e test"
ACCOUNTS = {"olivia": "beckon-ops,staff", "victor": "staff", "mallory": "contractors"}


@pytest.fixture(scope="module")
def provider_and_console(tmp_path_factory):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: install Debian's nodejs and npm (scripts/test does)")
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").exists():
        pytest.fail(f"oidc-provider is not installed: run `npm ci` in {PROVIDER_DIR} (scripts/test does)")
    provider_port, console_port = free_port(), free_port()
    redirect = f"http://127.0.0.1:{console_port}/api/v1/oidc/callback"
    cmd = [node, "provider.mjs", str(provider_port), CLIENT_ID, CLIENT_SECRET, redirect,
           *(f"{name}={groups}" for name, groups in ACCOUNTS.items())]
    proc = subprocess.Popen(cmd, cwd=PROVIDER_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=die_with_parent)
    lines: list[str] = []
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + PROVIDER_START_TIMEOUT
    while not any("oidc provider ready" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail("the OpenID provider did not start:\n" + "\n".join(lines[-20:]))
        time.sleep(0.1)
    secret = tmp_path_factory.mktemp("oidc") / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    data = tmp_path_factory.mktemp("beckon-sso") / "data"
    beckon = start_beckon(
        data, console_port, "--demo-agents", "0",
        "--oidc-issuer", f"http://127.0.0.1:{provider_port}",
        "--oidc-client-id", CLIENT_ID,
        "--oidc-client-secret-file", str(secret),
        "--oidc-provider-name", "Example ID",
        "--oidc-scope", "openid,profile,groups",
        "--oidc-role", "beckon-ops=operator",
        "--oidc-role", "staff=viewer",
    )
    yield beckon
    stop(beckon.process)
    stop(proc)
    assert CLIENT_SECRET not in "\n".join(beckon.lines), "the client secret was logged"


def fresh_login_page(browser, beckon):
    """The login page with no session here nor at the provider (both are on 127.0.0.1)."""
    go(browser, beckon, "login")
    browser.delete_all_cookies()
    browser.refresh()
    visible(browser, "login-form")


def sign_in_at_provider(browser, beckon, user):
    """Clicks "Sign in with Example ID" and signs in as `user` on the provider's pages."""
    fresh_login_page(browser, beckon)
    button = visible(browser, "sso-login")
    assert button.text == "Sign in with Example ID"
    button.click()
    login = wait(browser, lambda b: b.find_element(By.NAME, "login"), "no login page at the provider")
    login.send_keys(user)
    browser.find_element(By.NAME, "password").send_keys("any password", Keys.ENTER)
    # The provider asks once for consent to the scopes.
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "button.login-submit") and
         "Continue" in b.find_element(By.CSS_SELECTOR, "button.login-submit").text
         or b.current_url.startswith(beckon.url), "no consent page at the provider")
    if not browser.current_url.startswith(beckon.url):
        browser.find_element(By.CSS_SELECTOR, "button.login-submit").click()


def login_error(browser):
    return wait(browser, lambda b: b.find_element(By.ID, "login-error").is_displayed()
                and b.find_element(By.ID, "login-error").text, "the login page shows no error")


def audit(beckon):
    """The audit log, read with the admin's password."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    body = json.dumps({"user": "admin", "password": beckon.password}).encode()
    opener.open(urllib.request.Request(beckon.url + "/api/v1/login", body,
                                       {"Content-Type": "application/json"}), timeout=10)
    with opener.open(beckon.url + "/api/v1/audit?limit=100", timeout=10) as r:
        return json.load(r)


def test_an_operator_signs_in_through_the_provider(browser, provider_and_console):
    beckon = provider_and_console
    sign_in_at_provider(browser, beckon, "olivia")
    visible(browser, "view-dashboard")
    wait(browser, lambda b: b.find_element(By.ID, "who").text == "Logged in as olivia (operator)",
         "the header does not show olivia as operator")
    go(browser, beckon, "agents")
    visible(browser, "view-agents")
    wait(browser, lambda b: b.find_element(By.ID, "action-wake").is_displayed(),
         "the operator is not offered wake-up calls")
    assert not browser.find_element(By.ID, "action-revoke").is_displayed()
    entries = audit(beckon)
    logins = [e for e in entries if e["what"] == "login" and e["who"] == "user:olivia"]
    assert logins and logins[0]["detail"]["via"] == "oidc", entries
    assert logins[0]["detail"]["role"] == "operator"


def test_a_viewer_signs_in_without_operator_controls(browser, provider_and_console):
    beckon = provider_and_console
    sign_in_at_provider(browser, beckon, "victor")
    wait(browser, lambda b: b.find_element(By.ID, "who").text == "Logged in as victor (viewer)",
         "the header does not show victor as viewer")
    go(browser, beckon, "agents")
    visible(browser, "view-agents")
    assert not browser.find_element(By.ID, "action-wake").is_displayed()


def test_a_user_without_a_mapped_group_is_refused(browser, provider_and_console):
    beckon = provider_and_console
    sign_in_at_provider(browser, beckon, "mallory")
    message = login_error(browser)
    assert "mallory has no Beckon role" in message and "contractors" in message, message
    assert "sso_error" not in browser.current_url, "the message stays in the address bar"
    assert any(e["what"] == "login.refused" and e["detail"]["user"] == "mallory" for e in audit(beckon))


def test_a_sign_in_cancelled_at_the_provider_ends_on_the_login_page(browser, provider_and_console):
    beckon = provider_and_console
    fresh_login_page(browser, beckon)
    visible(browser, "sso-login").click()
    wait(browser, lambda b: b.find_element(By.NAME, "login"), "no login page at the provider")
    browser.find_element(By.LINK_TEXT, "[ Cancel ]").click()
    message = login_error(browser)
    assert "Example ID refused the sign-in: access_denied" in message, message


def test_a_callback_this_browser_did_not_start_is_refused(browser, provider_and_console):
    beckon = provider_and_console
    fresh_login_page(browser, beckon)
    browser.get(beckon.url + "/api/v1/oidc/callback?code=stolen&state=forged")
    message = login_error(browser)
    assert "not started by this console" in message, message


def test_local_users_still_log_in_beside_single_sign_on(browser, provider_and_console):
    beckon = provider_and_console
    fresh_login_page(browser, beckon)
    name = visible(browser, "login-user")
    name.clear()
    name.send_keys("admin")
    browser.find_element(By.ID, "login-password").send_keys(beckon.password, Keys.ENTER)
    wait(browser, lambda b: b.find_element(By.ID, "who").text == "Logged in as admin (admin)",
         "the local admin could not log in")
    # The single sign-on users are listed, their role marked as the provider's.
    go(browser, beckon, "users")
    wait(browser, lambda b: "operator (single sign-on)" in b.find_element(
        By.CSS_SELECTOR, "#users-table tr[data-user=olivia]").text, "olivia is not listed as SSO operator")
    browser.delete_all_cookies()
