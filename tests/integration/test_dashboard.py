"""The web dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, with
the administrator's client certificate. Screenshots of the states that matter (Normal, Warning
with its reason, Critical, a test failover in progress) are checked by their colours, and the
actions go through, each behind a confirmation."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import ssl
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.integration.replication_env import PRIMARY, REPLICA, make_pair, replicated_vm, wait_for
from tests.localcluster import Cluster

CHROMIUM = "/usr/bin/chromium"
COLOURS = {
    "Normal": (0x2E, 0x85, 0x40),
    "Warning": (0xE0, 0xA0, 0x00),
    "Critical": (0xC6, 0x28, 0x28),
}


def png_pixels(data: bytes) -> list[tuple[int, int, int]]:
    """The RGB pixels of an 8-bit RGB or RGBA PNG (what Chromium's screenshots are)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    channels = 4
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, _, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * channels
    pixels: list[tuple[int, int, int]] = []
    previous = bytearray(stride)
    for row in range(len(raw) // (stride + 1)):
        kind, line = (
            raw[row * (stride + 1)],
            bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        pixels += [tuple(line[i : i + 3]) for i in range(0, stride, channels)]  # type: ignore[misc]
        previous = line
    return pixels


def share(pixels: list[tuple[int, int, int]], colour: tuple[int, int, int]) -> float:
    near = [p for p in pixels if all(abs(x - y) <= 12 for x, y in zip(p, colour, strict=True))]
    return len(near) / len(pixels)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # Root in a container: Chromium's own sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def admin_context(browser: Browser, cluster: Cluster) -> BrowserContext:
    admin = cluster.base / "admin"
    return browser.new_context(
        ignore_https_errors=True,  # the test CA is not in the browser's trust store
        client_certificates=[
            {
                "origin": f"https://127.0.0.1:{host.mgmt_port}",
                "certPath": str(admin / "cert.pem"),
                "keyPath": str(admin / "key.pem"),
            }
            for host in cluster.hosts.values()
        ],
        viewport={"width": 1280, "height": 900},
    )


def open_dashboard(context: BrowserContext, cluster: Cluster, host: str) -> Page:
    page = context.new_page()
    page.goto(f"https://127.0.0.1:{cluster.hosts[host].mgmt_port}/dashboard")
    page.wait_for_selector("body[data-loaded='1']")
    return page


def health_shot(page: Page, shots: Path, name: str, level: str) -> str:
    page.reload()
    page.wait_for_selector(f"tr[data-vm='app'] .badge[data-health='{level}']", timeout=20_000)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    badge = page.locator("tr[data-vm='app'] .badge").screenshot()
    assert share(png_pixels(badge), COLOURS[level]) > 0.4, f"the badge is not {level}'s colour"
    return page.locator("tr[data-vm='app'] .reasons").inner_text() if level != "Normal" else ""


def click(page: Page, label: str) -> None:
    """Click the VM's button ``label`` and confirm."""
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("tr[data-vm='app'] button", has_text=label).click()


def test_dashboard_states_and_actions(cluster: Cluster, browser: Browser) -> None:
    pair = make_pair(cluster)
    replicated_vm(pair, "app", "--recovery-history", "1")
    shots = cluster.base / "screenshots"
    shots.mkdir()
    context = admin_context(browser, cluster)
    page = open_dashboard(context, cluster, PRIMARY)
    assert page.locator("#host").inner_text() == PRIMARY

    health_shot(page, shots, "normal", "Normal")
    bars = page.locator("#chart-size rect").count()
    assert bars == pair.measure("app")["successful_replication_count"] >= 1

    # Warning, with its reason: application-consistent points asked for, no guest agent.
    pair.cli("replication", "set", "app", "--snapshot-frequency", "1")
    pair.cli("replication", "sync", "app")
    reasons = health_shot(page, shots, "warning", "Warning")
    assert "guest agent of VM app does not answer" in reasons, reasons

    # Critical: the replica server is gone.
    cluster.stop(REPLICA)
    assert pair.cli("replication", "sync", "app", check=False).returncode == 6
    reasons = health_shot(page, shots, "critical", "Critical")
    assert "cannot send replication data" in reasons, reasons
    cluster.start(REPLICA)
    pair.cli("replication", "sync", "app")

    # A test failover, started from the replica's dashboard, behind a confirmation.
    replica_page = open_dashboard(context, cluster, REPLICA)
    dismissed = replica_page.locator("tr[data-vm='app'] button", has_text="Test failover")
    replica_page.once("dialog", lambda dialog: dialog.dismiss())
    dismissed.click()
    replica_page.wait_for_timeout(1000)
    assert not [v for v in pair.json("vm", "list", host=REPLICA) if v["name"] == "app - Test"]
    replica_page.once("dialog", lambda dialog: dialog.accept())
    dismissed.click()
    replica_page.wait_for_selector("tr[data-vm='app'] .testing", timeout=60_000)
    replica_page.screenshot(path=str(shots / "test-failover.png"), full_page=True)
    pill = replica_page.locator("tr[data-vm='app'] .testing").screenshot()
    assert share(png_pixels(pill), (0x5E, 0x35, 0xB1)) > 0.4
    assert [v for v in pair.json("vm", "list", host=REPLICA) if v["name"] == "app - Test"]
    click(replica_page, "Stop test failover")
    replica_page.wait_for_selector("tr[data-vm='app'] .testing", state="detached", timeout=60_000)

    # Pause and resume from the primary's dashboard.
    page.reload()
    page.wait_for_selector("body[data-loaded='1']")
    click(page, "Pause")
    wait_for(lambda: pair.replication("app")["state"] == "Suspended", 30, "the pause")
    click(page, "Resume")
    wait_for(lambda: pair.replication("app")["state"] == "Replicating", 30, "the resume")

    # Planned failover (its first step, on the primary, with the VM off), then cancelled.
    cluster.cli("vm", "stop", "app", "--force", host=PRIMARY)
    page.reload()
    page.wait_for_selector("body[data-loaded='1']")
    click(page, "Planned failover")
    wait_for(lambda: pair.replication("app")["state"] == "PreparedForFailover", 60, "prepare")
    click(page, "Cancel planned failover")
    wait_for(lambda: pair.replication("app")["state"] == "Replicating", 30, "the cancel")

    # Tracking lost (the VM's QEMU killed): Critical, and a resynchronization from the page.
    cluster.cli("vm", "start", "app", host=PRIMARY)
    pid = cluster.qemu_pids()[0]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pair.replication("app")["state"] == "WaitingForStartResynchronize", 30, "loss")
    cluster.cli("vm", "start", "app", host=PRIMARY)
    page.reload()
    page.wait_for_selector("tr[data-vm='app'] .badge[data-health='Critical']")
    click(page, "Resynchronize")
    wait_for(lambda: pair.replication("app")["state"] == "Replicating", 120, "the resync")
    context.close()
    keep = os.environ.get("VMREPLICA_SCREENSHOTS")
    if keep:  # for the docs: VMREPLICA_SCREENSHOTS=docs/dashboard pytest -k dashboard
        shutil.copytree(shots, keep, dirs_exist_ok=True)


def test_dashboard_and_api_refuse_what_a_browser_should_not_do(cluster: Cluster) -> None:
    context = ssl.create_default_context(cafile=str(cluster.ca_dir / "ca.pem"))
    context.check_hostname = False
    other = cluster.hosts[REPLICA].dir / "tls"  # a host's certificate: right CA, not an admin
    context.load_cert_chain(str(other / "cert.pem"), str(other / "key.pem"))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", cluster.hosts[PRIMARY].mgmt_port, context=context
    )
    conn.request("GET", "/dashboard")
    assert conn.getresponse().status == 403
    conn.close()
    admin = ssl.create_default_context(cafile=str(cluster.ca_dir / "ca.pem"))
    admin.check_hostname = False
    admin.load_cert_chain(
        str(cluster.base / "admin" / "cert.pem"), str(cluster.base / "admin" / "key.pem")
    )
    conn = http.client.HTTPSConnection("127.0.0.1", cluster.hosts[PRIMARY].mgmt_port, context=admin)
    conn.request("GET", "/dashboard")
    answer = conn.getresponse()
    assert answer.status == 200 and b"dashboard.js" in answer.read()
    assert "frame-ancestors 'none'" in (answer.getheader("Content-Security-Policy") or "")
    # What a form on another site could send with the browser's certificate: not JSON.
    conn.request(
        "POST", "/v1/replication.suspend", body="vm=app", headers={"Content-Type": "text/plain"}
    )
    refused = conn.getresponse()
    assert refused.status == 400 and b"JSON body" in refused.read()
    conn.close()
