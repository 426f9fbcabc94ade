"""Fixtures for the console UI's end-to-end test.

`beckon` starts `beckon up --demo-agents 3` on free loopback ports in a temporary data folder
and reads the admin password from its output. `browser` is Debian's headless Chromium driven
through chromedriver (WebDriver). When a test fails, a screenshot of the page goes to
target/e2e-screenshots/ and its path is printed.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "target" / "e2e-screenshots"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
STARTUP_TIMEOUT = 30.0


def die_with_parent() -> None:
    """Run in a child before exec: SIGKILL it if the test process dies, so nothing is left running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def beckon_bin() -> Path:
    configured = os.environ.get("BECKON_BIN")
    path = Path(configured) if configured else REPO_ROOT / "target" / "debug" / "beckon"
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.exists():
        pytest.fail(f"beckon binary not found at {path}: build it with `cargo build -p beckon`, or point BECKON_BIN at it")
    return path


@dataclass
class Beckon:
    """`beckon up` under test."""

    url: str
    password: str
    data: Path
    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def output_tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


def _reader(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


def start_beckon(data: Path, console_port: int, *extra: str, env: dict[str, str] | None = None) -> Beckon:
    """Starts `beckon up` in `data` with its console on `console_port`; returns once it is
    ready and has printed its console URL and admin password."""
    cmd = [
        str(beckon_bin()), "up", "--data", str(data),
        "--console", f"127.0.0.1:{console_port}",
        "--mqtts", f"127.0.0.1:{free_port()}",
        "--fallback", "off",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent,
                            env={**os.environ, "RUST_LOG": "info", **(env or {})})
    lines: list[str] = []
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    password = url = None
    while time.monotonic() < deadline:
        for line in list(lines):
            if m := re.search(r"login:\s+user admin, password (\S+)", line):
                password = m.group(1)
            if m := re.search(r"console:\s+(http://\S+)", line):
                url = m.group(1)
        if any("beckon up: ready" in line for line in lines) and password and url:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    if not (password and url):
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail("beckon up did not print its console URL and admin password within "
                    f"{STARTUP_TIMEOUT:.0f} s:\n" + "\n".join(lines[-40:]))
    return Beckon(url=url, password=password, data=data, process=proc, lines=lines)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT, then SIGKILL after 10 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def beckon(tmp_path_factory):
    data = tmp_path_factory.mktemp("beckon-up") / "data"
    b = start_beckon(data, free_port(), "--demo-agents", "3")
    yield b
    stop(b.process)


@pytest.fixture(scope="session")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} not found: install it with `apt-get install -y chromium chromium-driver` (scripts/test does)")
    profile = tempfile.mkdtemp(prefix="beckon-e2e-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1366,900",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    driver = item.funcargs.get("browser")
    if driver is None:
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{item.name}-{int(time.time())}.png"
    try:
        driver.save_screenshot(str(path))
        print(f"\nscreenshot of the failing page: {path}")
        report.sections.append(("screenshot", str(path)))
        logs = driver.get_log("browser")
        if logs:
            report.sections.append(("browser console", "\n".join(str(entry) for entry in logs[-30:])))
    except Exception as err:  # the browser itself may be what failed
        print(f"\nno screenshot: {err}")
    b = item.funcargs.get("beckon")
    if b is not None:
        report.sections.append(("beckon up output (last lines)", b.output_tail()))
