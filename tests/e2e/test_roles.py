"""Roles in the web console, against the same `beckon up --demo-agents 3` as the other tests.

The admin creates a viewer and an operator on the Users page. The viewer sees everything but
no control to change anything, and the API refuses a wake-up call with 403 naming the operator
role. The operator wakes an agent but sees no controls for deleting agents, settings, users or
tokens. An agent last seen 40 days ago (written into the console's database) is counted as
stale on the dashboard; its tile leads to the Agents page filtered to it, where the admin
removes it in one step.
"""

from __future__ import annotations

import json
import sqlite3
import time

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select

from test_console_ui import go, listed_agents, select_agent, visible, wait

PASSWORDS = {"vera": "vera's long password", "otto": "otto's long password"}
DAY_MS = 24 * 3600 * 1000


def log_in(browser, beckon, user, password):
    # Cookies are per host, not per port: end whichever session the browser holds here.
    browser.get(beckon.url + "/#/dashboard")
    browser.delete_all_cookies()
    browser.refresh()
    name = visible(browser, "login-user")
    name.clear()
    name.send_keys(user)
    browser.find_element(By.ID, "login-password").send_keys(password, Keys.ENTER)
    visible(browser, "view-dashboard")
    wait(browser, lambda b: b.find_element(By.ID, "who").text.startswith(f"Logged in as {user} "),
         f"the header never named {user}")


def shown(browser, element_id):
    return browser.find_element(By.ID, element_id).is_displayed()


def fetch(browser, method, path, body=None):
    """(status, JSON body) of an API request made from the page with its session."""
    return browser.execute_async_script(
        "const [method, path, body, done] = arguments;"
        "fetch('/api/v1' + path, {method, credentials: 'same-origin',"
        " headers: body ? {'Content-Type': 'application/json'} : {}, body: body || undefined})"
        ".then(async r => done([r.status, await r.json().catch(() => null)]));",
        method, path, json.dumps(body) if body is not None else None)


def add_stale_agent(beckon, agent_id):
    """An agent enrolled, last checked in and disconnected 40 days ago."""
    at = int(time.time() * 1000) - 40 * DAY_MS
    db = sqlite3.connect(beckon.data / "console" / "console.db", timeout=10)
    with db:
        db.execute(
            "INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, secret_hash,"
            " last_checkin, presence, presence_at) VALUES (?, ?, 'old.example', 'Debian 12', '[]', '[]',"
            " ?, x'00', ?, 'offline', ?)", (agent_id, agent_id, at, at, at))
    db.close()


def test_the_admin_creates_a_viewer_and_an_operator_on_the_users_page(browser, beckon):
    log_in(browser, beckon, "admin", beckon.password)
    browser.find_element(By.ID, "nav-users").click()
    visible(browser, "user-form")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#users-table tr[data-user=admin][data-role=admin]"),
         "the admin is not listed as admin")
    for name, role in (("vera", "viewer"), ("otto", "viewer")):
        browser.find_element(By.ID, "user-name").send_keys(name)
        browser.find_element(By.ID, "user-password").send_keys(PASSWORDS[name])
        Select(browser.find_element(By.ID, "user-role")).select_by_value(role)
        browser.find_element(By.ID, "user-create").click()
        wait(browser, lambda b: f"User {name} created as {role}" in b.find_element(By.ID, "user-message").text,
             f"creating {name} was not confirmed")
    # Otto becomes an operator through the role select of his row.
    select = wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, "select[data-user=otto]"), "no role select for otto")
    Select(select).select_by_value("operator")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#users-table tr[data-user=otto][data-role=operator]"),
         "otto never showed as operator")
    status, audit = fetch(browser, "GET", "/audit")
    assert status == 200
    assert any(e["what"] == "user.role" and e["detail"] == {"name": "otto", "old": "viewer", "new": "operator"}
               and e["who"] == "user:admin" for e in audit), audit


def test_a_viewer_sees_everything_and_no_control_to_change_it(browser, beckon):
    add_stale_agent(beckon, "old-laptop")
    log_in(browser, beckon, "vera", PASSWORDS["vera"])
    wait(browser, lambda b: b.find_element(By.ID, "dash-stale").text == "1", "the stale agent is not counted")

    go(browser, beckon, "agents")
    wait(browser, lambda b: {"demo-01", "demo-02", "demo-03"} <= set(listed_agents(b)), "the viewer sees no agents")
    for control in ("agent-actions", "action-wake", "action-wol", "action-revoke", "action-group"):
        assert not shown(browser, control), f"a viewer is shown #{control}"

    go(browser, beckon, "enroll")
    wait(browser, lambda b: shown(b, "view-enroll"), "no enrollment page")
    assert not shown(browser, "enroll-form")
    go(browser, beckon, "api-tokens")
    wait(browser, lambda b: shown(b, "view-api-tokens"), "no API tokens page")
    assert not shown(browser, "api-token-form")
    go(browser, beckon, "users")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#users-table tr[data-user=vera][data-role=viewer]"),
         "the viewer does not see the users")
    assert not shown(browser, "user-form")
    assert not browser.find_elements(By.CSS_SELECTOR, "#users-table select"), "a viewer may change roles"
    go(browser, beckon, "settings")
    wait(browser, lambda b: b.find_element(By.ID, "set-agents-stale").get_attribute("value") == "30",
         "the viewer does not see the settings")
    assert not shown(browser, "settings-save")
    assert not browser.find_element(By.ID, "set-wol-port").is_enabled()

    # The API refuses what the page does not offer, and says which role it needs.
    status, body = fetch(browser, "POST", "/calls", {"target": {"agents": ["demo-01"]}})
    assert status == 403, body
    assert "this needs the operator role" in body["error"], body
    assert body["needs_role"] == "operator" and body["role"] == "viewer", body


def test_an_operator_wakes_agents_but_changes_nothing_else(browser, beckon):
    log_in(browser, beckon, "otto", PASSWORDS["otto"])
    go(browser, beckon, "agents")
    wait(browser, lambda b: "demo-01" in listed_agents(b), "the operator sees no agents")
    assert shown(browser, "action-wake") and shown(browser, "action-wol")
    assert not shown(browser, "action-revoke") and not shown(browser, "action-group")
    select_agent(browser, "demo-01")
    browser.find_element(By.ID, "action-wake").click()
    visible(browser, "view-call")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#call-deliveries tr[data-agent-id='demo-01']"),
         "the operator's call does not list demo-01")

    go(browser, beckon, "settings")
    wait(browser, lambda b: shown(b, "view-settings"), "no settings page")
    assert not shown(browser, "settings-save")
    go(browser, beckon, "users")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#users-table tr[data-user=otto]"), "no users listed")
    assert not shown(browser, "user-form")
    status, body = fetch(browser, "DELETE", "/agents/demo-03")
    assert status == 403 and "this needs the admin role" in body["error"], body
    status, body = fetch(browser, "PATCH", "/users/otto", {"role": "admin"})
    assert status == 403, body


def test_the_admin_removes_stale_agents_in_one_step_from_the_dashboard(browser, beckon):
    log_in(browser, beckon, "admin", beckon.password)
    wait(browser, lambda b: b.find_element(By.ID, "dash-stale").text == "1", "the stale agent is not counted")
    browser.find_element(By.ID, "dash-stale-link").click()
    visible(browser, "view-agents")
    assert browser.find_element(By.ID, "agent-stale").is_selected()
    wait(browser, lambda b: listed_agents(b) == {"old-laptop": "offline"}, "the stale filter does not list only old-laptop")
    browser.find_element(By.ID, "agents-select-all").click()
    browser.find_element(By.ID, "action-revoke").click()
    wait(browser, EC.alert_is_present(), "deleting asked for no confirmation")
    browser.switch_to.alert.accept()
    wait(browser, lambda b: "Deleted 1 agent(s)" in b.find_element(By.ID, "agents-message").text, "no removal message")
    wait(browser, lambda b: listed_agents(b) == {}, "the stale agent is still listed")
    go(browser, beckon, "dashboard")
    wait(browser, lambda b: b.find_element(By.ID, "dash-stale").text == "0", "the stale count did not drop to 0")
    status, agents = fetch(browser, "GET", "/agents?stale=true")
    assert status == 200 and agents == [], agents
