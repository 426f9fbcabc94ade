"""The console's web UI, end to end, in headless Chromium against `beckon up --demo-agents 3`.

The tests run in file order and share one `beckon up` and one browser, like an administrator
going through the console: a wrong password is refused, log in, three demo agents online, a
wake-up call to one reaches `finished` live, an extra agent process enrolled from the
Enrollment page goes online and, once killed, offline; settings refuse a bad value next to its
field; Wake-on-LAN to 127.0.0.1 is sent, recorded and shown (and the magic packet arrives); an
API token made on its page works against the API until it is revoked there. Last, a
console whose broker is unreachable shows "Push service servers are not reachable" and the fix.
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import time

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import beckon_bin, die_with_parent, free_port

WAIT = 30  # seconds: the longest any step may take


def wait(browser, condition, message, timeout=WAIT):
    # The pages re-render their tables as data arrives: an element read a moment ago may be
    # gone; the condition is then simply tried again.
    return WebDriverWait(browser, timeout, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException]).until(condition, message)


def visible(browser, element_id):
    return wait(browser, EC.visibility_of_element_located((By.ID, element_id)), f"#{element_id} never became visible")


def listed_agents(browser):
    """{agent id: presence} of the agents table, read in one step in the page."""
    return browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll("
        "'#agents-table tbody tr[data-testid=agent-row]')].map(r => [r.dataset.agentId, r.dataset.presence]))")


def select_agent(browser, agent_id):
    """Ticks an agent's box in the agents table. The table is re-rendered as presence changes
    arrive, so a box found a moment ago may be gone before the click lands; the selection itself
    lives in the page's state and survives, so the box is looked up again until it shows ticked."""
    def tick(b):
        box = b.find_element(By.CSS_SELECTOR, f"input.agent-select[data-agent-id='{agent_id}']")
        if not (box.is_displayed() and box.is_enabled()):
            return False
        if not box.is_selected():
            box.click()
        return box.is_selected()
    wait(browser, tick, f"the box of {agent_id} never showed ticked")


def go(browser, beckon, fragment):
    browser.get(f"{beckon.url}/#/{fragment}")


def test_page_is_served_with_a_strict_content_security_policy(beckon):
    import urllib.request

    with urllib.request.urlopen(beckon.url + "/", timeout=10) as r:
        csp = r.headers.get("Content-Security-Policy", "")
        body = r.read().decode()
    assert "default-src 'none'" in csp and "script-src 'self'" in csp, csp
    assert "/ui/app.js" in body


def test_wrong_password_is_refused_with_a_message(browser, beckon):
    browser.get(beckon.url + "/")
    visible(browser, "login-form")
    password = browser.find_element(By.ID, "login-password")
    password.send_keys("not-the-password")
    browser.find_element(By.ID, "login-submit").click()
    error = visible(browser, "login-error")
    assert "Wrong user name or password" in error.text
    assert browser.find_element(By.ID, "view-login").is_displayed()
    assert not browser.find_element(By.ID, "top").is_displayed(), "navigation shown without a session"


def test_login_shows_three_demo_agents_online(browser, beckon):
    browser.get(beckon.url + "/")
    password = visible(browser, "login-password")
    password.clear()
    password.send_keys(beckon.password, Keys.ENTER)  # the form submits from the keyboard
    visible(browser, "view-dashboard")
    wait(browser, lambda b: b.find_element(By.ID, "dash-online").text == "3",
         "the dashboard never showed 3 agents online")
    wait(browser, lambda b: b.find_element(By.ID, "push-status").get_attribute("data-state") == "connected",
         "the push service never showed as connected")
    assert not browser.find_element(By.ID, "push-notice").is_displayed()
    assert browser.find_element(By.ID, "database-line").text.startswith("Database: SQLite, sqlite:")

    browser.find_element(By.ID, "nav-agents").click()
    visible(browser, "view-agents")
    wait(browser, lambda b: listed_agents(b) == {"demo-01": "online", "demo-02": "online", "demo-03": "online"},
         "three online demo agents never listed")

    # Search narrows the list.
    browser.find_element(By.ID, "agent-search").send_keys("demo-02")
    wait(browser, lambda b: list(listed_agents(b)) == ["demo-02"],
         "search for demo-02 did not narrow the list to it")
    browser.find_element(By.ID, "agent-search").clear()
    browser.find_element(By.ID, "agent-search").send_keys(Keys.BACKSPACE)
    wait(browser, lambda b: len(listed_agents(b)) == 3, "clearing the search did not bring back all agents")


def test_wake_up_call_to_one_agent_reaches_finished_live(browser, beckon):
    go(browser, beckon, "agents")
    wait(browser, lambda b: len(listed_agents(b)) == 3, "agents never listed")
    assert not browser.find_element(By.ID, "action-wake").is_enabled(), "wake-up enabled with nothing selected"
    select_agent(browser, "demo-02")
    wait(browser, lambda b: b.find_element(By.ID, "agents-selected-count").text == "1 selected",
         "selection count did not show 1")
    reason = browser.find_element(By.ID, "wake-reason")
    reason.clear()
    reason.send_keys("e2e test")
    browser.find_element(By.ID, "action-wake").click()
    visible(browser, "view-call")
    assert "#/calls/" in browser.current_url
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#call-deliveries tr[data-agent-id='demo-02']"),
         "the call view never listed demo-02")
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#call-deliveries tr[data-agent-id='demo-02']")
         .get_attribute("data-state") == "finished",
         "demo-02 never reached finished in the call view")
    rows = browser.find_elements(By.CSS_SELECTOR, "#call-deliveries tbody tr")
    assert len(rows) == 1, "a call to one agent lists other agents"
    assert "e2e test" in browser.find_element(By.ID, "call-summary").text
    # The call shows up in the calls list too.
    browser.find_element(By.ID, "nav-calls").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#calls-table tr[data-testid=call-row]"),
         "the call is not in the calls list")


def test_selected_agents_join_a_group_and_the_group_filter_lists_them(browser, beckon):
    go(browser, beckon, "agents")
    wait(browser, lambda b: len(listed_agents(b)) == 3, "agents never listed")
    for agent_id in ("demo-01", "demo-03"):
        select_agent(browser, agent_id)
    wait(browser, lambda b: b.find_element(By.ID, "agents-selected-count").text == "2 selected",
         "selection count did not show 2")
    browser.find_element(By.ID, "group-name").send_keys("lab")
    browser.find_element(By.ID, "action-group").click()
    wait(browser, lambda b: "Added 2 agent(s) to group lab" in b.find_element(By.ID, "agents-message").text,
         "adding to the group was not confirmed")
    wait(browser, lambda b: any(o.get_attribute("value") == "lab"
                                for o in b.find_elements(By.CSS_SELECTOR, "#agent-group option")),
         "the new group is not offered in the group filter")
    Select(browser.find_element(By.ID, "agent-group")).select_by_value("lab")
    wait(browser, lambda b: sorted(listed_agents(b)) == ["demo-01", "demo-03"],
         "the group filter does not list exactly the two agents")


@pytest.fixture(scope="module")
def extra_agent_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("extra-agent")


def test_enrolled_agent_process_goes_online_then_offline_when_killed(browser, beckon, extra_agent_dir):
    """Stops an agent the way the product sees it: a real `beckon agent run` process, enrolled
    with the command line the Enrollment page shows, is killed."""
    go(browser, beckon, "enroll")
    visible(browser, "enroll-form")
    browser.find_element(By.ID, "enroll-label").send_keys("e2e extra agent")
    browser.find_element(By.ID, "enroll-create").click()
    command = visible(browser, "enroll-command").text
    words = shlex.split(command)
    assert words[:3] == ["beckon", "agent", "enroll"], command
    assert words[words.index("--console") + 1] == beckon.url, command
    assert words[words.index("--token") + 1].startswith("bke_"), command
    browser.find_element(By.ID, "enroll-copy").click()
    wait(browser, lambda b: b.find_element(By.ID, "enroll-copy-status").text != "", "copy gave no feedback")
    wait(browser, lambda b: any("e2e extra agent" in r.text for r in
                                b.find_elements(By.CSS_SELECTOR, "#tokens-table tr[data-testid=token-row]")),
         "the new token is not listed")

    config = extra_agent_dir / "agent.toml"
    enroll = subprocess.run(
        [str(beckon_bin()), *words[1:], "--state-dir", str(extra_agent_dir / "state"),
         "--config-out", str(config), "--agent-id", "e2e-extra", "--name", "e2e-extra"],
        capture_output=True, text=True, timeout=30, preexec_fn=die_with_parent)
    assert enroll.returncode == 0, f"enrolling with the shown command failed:\n{enroll.stdout}\n{enroll.stderr}"

    log = open(extra_agent_dir / "agent.log", "w")
    agent = subprocess.Popen([str(beckon_bin()), "agent", "run", "--config", str(config)],
                             stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        go(browser, beckon, "agents")
        wait(browser, lambda b: listed_agents(b).get("e2e-extra") == "online",
             "the extra agent never showed online (agent log: %s)" % (extra_agent_dir / "agent.log"))
        go(browser, beckon, "dashboard")
        wait(browser, lambda b: b.find_element(By.ID, "dash-online").text == "4",
             "the dashboard never counted 4 agents online")
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        wait(browser, lambda b: b.find_element(By.ID, "dash-online").text == "3"
             and b.find_element(By.ID, "dash-offline").text == "1",
             "the dashboard never showed the killed agent offline")
        go(browser, beckon, "agents?presence=offline")
        wait(browser, lambda b: listed_agents(b) == {"e2e-extra": "offline"},
             "the offline filter does not list exactly the killed agent")
        assert Select(browser.find_element(By.ID, "agent-presence")).first_selected_option.get_attribute("value") == "offline"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
        log.close()


def test_settings_show_errors_at_the_field_and_save_wake_on_lan_address(browser, beckon):
    go(browser, beckon, "settings")
    addresses = visible(browser, "set-wol-addresses")
    wait(browser, lambda b: b.find_element(By.ID, "set-wol-port").get_attribute("value") == "9",
         "settings never loaded")
    # A value the API refuses: the message appears next to the field.
    port = browser.find_element(By.ID, "set-wol-port")
    port.clear()
    port.send_keys("0")
    browser.find_element(By.ID, "settings-save").click()
    error = visible(browser, "err-wol-port")
    assert "1 to 65535" in error.text, error.text
    assert port.get_attribute("aria-invalid") == "true"
    addresses.clear()
    addresses.send_keys("not-an-address")
    port.clear()
    port.send_keys("9")
    browser.find_element(By.ID, "settings-save").click()
    error = visible(browser, "err-wol-addresses")
    assert "wol.addresses" in error.text or "IP" in error.text, error.text
    assert not browser.find_element(By.ID, "err-wol-port").is_displayed()


def test_wake_on_lan_to_loopback_is_sent_and_recorded(browser, beckon):
    # Only ever 127.0.0.1: a UDP socket of the test receives the magic packets.
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(WAIT)
    udp_port = receiver.getsockname()[1]
    try:
        go(browser, beckon, "settings")
        wait(browser, lambda b: b.find_element(By.ID, "set-wol-port").get_attribute("value") == "9",
             "settings never loaded")
        addresses = browser.find_element(By.ID, "set-wol-addresses")
        addresses.clear()
        addresses.send_keys("127.0.0.1")
        subnet = browser.find_element(By.ID, "set-wol-subnet")
        if subnet.is_selected():
            subnet.click()  # no subnet broadcast: 127.0.0.1 is the only destination
        port = browser.find_element(By.ID, "set-wol-port")
        port.clear()
        port.send_keys(str(udp_port))
        repeats = browser.find_element(By.ID, "set-wol-repeats")
        repeats.clear()
        repeats.send_keys("1")
        browser.find_element(By.ID, "settings-save").click()
        wait(browser, lambda b: b.find_element(By.ID, "settings-message").text == "Settings saved.",
             "settings were not saved")
        browser.refresh()
        wait(browser, lambda b: b.find_element(By.ID, "set-wol-addresses").get_attribute("value") == "127.0.0.1",
             "the saved address did not come back after a reload")

        go(browser, beckon, "agents")
        select_agent(browser, "demo-01")
        browser.find_element(By.ID, "action-wol").click()
        wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#wol-table tr[data-testid=wol-row][data-agent-id='demo-01']"),
             "no Wake-on-LAN send shown for demo-01")
        row = browser.find_element(By.CSS_SELECTOR, "#wol-table tr[data-testid=wol-row][data-agent-id='demo-01']")
        assert f"127.0.0.1:{udp_port}" in row.text, row.text
        assert "02:be:c0:00:00:00" in row.text, row.text
        assert "sent" in row.text, row.text
        assert "recorded" in browser.find_element(By.ID, "agents-message").text

        packet, _ = receiver.recvfrom(2048)
        assert len(packet) == 102 and packet[:6] == b"\xff" * 6, packet[:16]
        assert packet[6:12] == bytes.fromhex("02bec0000000")
    finally:
        receiver.close()


def api_status(beckon, path, token):
    """(HTTP status, parsed JSON body) of GET /api/v1<path> with `Authorization: Bearer token`."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(beckon.url + "/api/v1" + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def api_token_row(browser, name):
    """The API tokens table's row named `name`, or None."""
    for row in browser.find_elements(By.CSS_SELECTOR, "#api-tokens-table tr[data-testid=api-token-row]"):
        if row.find_elements(By.TAG_NAME, "td")[0].text == name:
            return row
    return None


def test_api_token_created_on_its_page_works_until_revoked_there(browser, beckon):
    go(browser, beckon, "api-tokens")
    shown = wait(browser, lambda b: next((v for v in ("view-api-tokens", "view-login")
                                          if b.find_element(By.ID, v).is_displayed()), None),
                 "neither the API tokens page nor the login page was shown")
    if shown == "view-login":  # run alone: log in first
        browser.find_element(By.ID, "login-password").send_keys(beckon.password, Keys.ENTER)
        visible(browser, "view-api-tokens")
    assert browser.find_element(By.ID, "nav-api-tokens").get_attribute("aria-current") == "page"

    # A token needs a name.
    browser.find_element(By.ID, "api-token-create").click()
    assert "Enter a name" in visible(browser, "api-token-error").text
    assert not browser.find_element(By.ID, "api-token-result").is_displayed()

    browser.find_element(By.ID, "api-token-name").send_keys("e2e integration")
    browser.find_element(By.ID, "api-token-create").click()
    secret = visible(browser, "api-token-secret").text
    assert re.fullmatch(r"bkt_\S+", secret), secret
    assert "shown only once" in browser.find_element(By.ID, "api-token-result").text
    assert not browser.find_element(By.ID, "api-token-error").is_displayed()
    browser.find_element(By.ID, "api-token-copy").click()
    wait(browser, lambda b: b.find_element(By.ID, "api-token-copy-status").text != "", "copy gave no feedback")
    row = wait(browser, lambda b: api_token_row(b, "e2e integration"), "the new API token is not listed")
    assert row.get_attribute("data-revoked") == "false" and "valid" in row.text, row.text

    # The shown secret is what the API accepts.
    status, agents = api_status(beckon, "/agents", secret)
    assert status == 200, agents
    assert {"demo-01", "demo-02", "demo-03"} <= {a["id"] for a in agents}, agents

    # Leaving the page and coming back: the secret is not shown again.
    go(browser, beckon, "dashboard")
    visible(browser, "view-dashboard")
    go(browser, beckon, "api-tokens")
    wait(browser, lambda b: api_token_row(b, "e2e integration"), "the API token is not listed after coming back")
    assert not browser.find_element(By.ID, "api-token-result").is_displayed()
    assert secret not in browser.find_element(By.ID, "view-api-tokens").text

    # Revoked on the page (after a confirmation): the API refuses it from then on.
    api_token_row(browser, "e2e integration").find_element(By.TAG_NAME, "button").click()
    wait(browser, EC.alert_is_present(), "revoking asked for no confirmation")
    browser.switch_to.alert.accept()
    wait(browser, lambda b: (r := api_token_row(b, "e2e integration")) is not None
         and r.get_attribute("data-revoked") == "true", "the API token never showed as revoked")
    row = api_token_row(browser, "e2e integration")
    assert "revoked" in row.text, row.text
    assert not row.find_element(By.TAG_NAME, "button").is_enabled()
    status, refusal = api_status(beckon, "/agents", secret)
    assert status == 401, refusal
    assert "API tokens page in the console" in refusal["error"], refusal


def test_push_service_down_shows_the_notice_and_its_fix(browser, tmp_path):
    """A console whose broker is unreachable (a loopback port nothing listens on) says so on
    the dashboard, with the doctor's fix."""
    dead_port = free_port()  # bound and released: nothing listens there
    console_port = free_port()
    data = tmp_path / "console"
    proc = subprocess.Popen(
        [str(beckon_bin()), "console", "--data-dir", str(data), "--listen", f"127.0.0.1:{console_port}",
         "--plain-http", "--broker", f"mqtts://127.0.0.1:{dead_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    try:
        password = None
        deadline = time.monotonic() + WAIT
        while password is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if m := re.search(r'password (\S+) \(shown once', line):
                password = m.group(1)
        assert password, "beckon console did not print the first password"
        browser.delete_all_cookies()
        browser.get(f"http://127.0.0.1:{console_port}/")
        field = visible(browser, "login-password")
        field.send_keys(password, Keys.ENTER)
        visible(browser, "view-dashboard")
        wait(browser, lambda b: b.find_element(By.ID, "push-status").get_attribute("data-state") == "down",
             "the dashboard never showed the push service down")
        notice = visible(browser, "push-message")
        assert notice.text == "Push service servers are not reachable"
        # Why (the failing port) and what to do about it.
        wait(browser, lambda b: str(dead_port) in b.find_element(By.ID, "push-why").text,
             "the notice does not say which port failed")
        wait(browser, lambda b: "Fix" in b.find_element(By.ID, "push-fix").text, "no fix shown")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_logout_ends_the_session(browser, beckon):
    browser.delete_all_cookies()
    browser.get(beckon.url + "/")
    visible(browser, "login-password").send_keys(beckon.password, Keys.ENTER)
    visible(browser, "view-dashboard")
    browser.find_element(By.ID, "logout").click()
    visible(browser, "view-login")
    go(browser, beckon, "agents")
    visible(browser, "view-login")
    assert not browser.find_element(By.ID, "view-agents").is_displayed()
