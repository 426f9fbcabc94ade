"""A cloned identity on the Agents page, against the same `beckon up --demo-agents 3`.

An agent flagged as in use on two machines (written into the console's database as the
console records it; the detection itself is tested in crates/console/tests/cloned_agents.rs
and crates/beckon/tests/clones.rs) is marked in the list, the Cloned filter lists only it, and
below the list both machines and the fix are shown; the admin clears the flag there.
"""

from __future__ import annotations

import json
import sqlite3
import time

from selenium.webdriver.common.by import By

from test_console_ui import go, listed_agents, visible, wait
from test_roles import fetch, log_in


def add_cloned_agent(beckon, agent_id):
    now = int(time.time() * 1000)
    previous = {"hostname": "twin-b.example", "os": "Debian 13", "macs": ["02:00:00:00:00:0b"],
                "addresses": [{"address": "10.0.0.12", "prefix_len": 24}]}
    db = sqlite3.connect(beckon.data / "console" / "console.db", timeout=10)
    with db:
        db.execute(
            "INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, secret_hash,"
            " last_checkin, presence, previous_inventory, inventory_changed_at, clone_detected_at)"
            " VALUES (?, ?, 'twin-a.example', 'Debian 13', '[]', '[\"02:00:00:00:00:0a\"]', ?, x'00', ?,"
            " 'online', ?, ?, ?)",
            (agent_id, agent_id, now, now, json.dumps(previous), now, now))
    db.close()


def test_a_cloned_agent_is_marked_shows_both_machines_and_the_admin_clears_it(browser, beckon):
    add_cloned_agent(beckon, "twin")
    log_in(browser, beckon, "admin", beckon.password)
    try:
        check_cloned_agent_page(browser, beckon)
    finally:
        # The other tests share this console and browser: three demo agents, no session.
        status, _ = fetch(browser, "DELETE", "/agents/twin")
        assert status == 204, status
        browser.delete_all_cookies()


def check_cloned_agent_page(browser, beckon):
    go(browser, beckon, "agents?cloned=1")
    visible(browser, "view-agents")
    assert browser.find_element(By.ID, "agent-cloned").is_selected()
    wait(browser, lambda b: set(listed_agents(b)) == {"twin"}, "the Cloned filter does not list only twin")
    row = browser.find_element(By.CSS_SELECTOR, "tr[data-agent-id=twin]")
    assert row.find_element(By.CSS_SELECTOR, "[data-testid=agent-cloned]").text == "cloned"

    panel = visible(browser, "clones-panel")
    entry = panel.find_element(By.CSS_SELECTOR, "[data-testid=clone-entry][data-agent-id=twin]")
    machines = entry.find_element(By.CSS_SELECTOR, "[data-testid=clone-machines]").text
    assert "twin-a.example" in machines and "twin-b.example" in machines, machines
    assert "02:00:00:00:00:0b" in machines, machines
    assert "beckon agent enroll --force" in entry.find_element(By.CSS_SELECTOR, "[data-testid=clone-fix]").text

    entry.find_element(By.CSS_SELECTOR, "[data-testid=clone-clear]").click()
    wait(browser, lambda b: listed_agents(b) == {}, "twin is still listed as cloned")
    wait(browser, lambda b: not b.find_element(By.ID, "clones-panel").is_displayed(), "the panel stays")
    assert "Cloned flag of twin cleared" in browser.find_element(By.ID, "agents-message").text
