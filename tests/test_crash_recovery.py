"""SIGKILL of the broker in the middle of a stream (issue 3, PROTOCOL.md rule 1).

Three senders stream 1,700 messages each (5,100 in all) to three recipients, one of them with two devices,
through the SDK. The broker process is killed with SIGKILL while the stream runs and restarted at once on the
same port and data directory. Every message must reach every recipient device exactly once, in the order it
was sent: what got ``sent`` survived the crash, the SDK outboxes re-send the rest, duplicates are dropped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from client_sdk import Client
from client_sdk.events import Message, Receipt
from tests.helpers import free_port

PER_SENDER = 1700
PAIRS = [("s0", "r0"), ("s1", "r1"), ("s2", "r2")]
RECIPIENT_DEVICES = {"r0": ["phone", "laptop"], "r1": ["phone"], "r2": ["phone"]}
ROOT = Path(__file__).resolve().parents[1]


def start_broker(config: Path, data: Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatserver", "run", "-c", str(config), "--bind", f"127.0.0.1:{port}",
         "--data-dir", str(data)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    ready = threading.Event()

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("chat-broker ready"):
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(30):
        proc.kill()
        raise AssertionError("the broker did not become ready within 30 s")
    return proc


def test_sigkill_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = tmp_path / "broker.yaml"
    config.write_text("limits:\n  send_burst: 100000\n  send_rate_per_s: 100000.0\nstaging:\n  flush_ms: 20\n")
    users = [name for pair in PAIRS for name in pair]
    subprocess.run(
        [sys.executable, "-m", "chatserver", "user", "import", "-", "--data-dir", str(data)],
        input="".join(f"{u}:{u}-pw\n" for u in users), text=True, check=True, cwd=ROOT, capture_output=True,
    )
    port = free_port()
    broker = start_broker(config, data, port)
    lock = threading.Lock()
    received: dict[str, list[tuple[str, str]]] = defaultdict(list)
    sent: dict[str, set[str]] = defaultdict(set)
    clients: list[Client] = []

    def make(user: str, device: str) -> Client:
        client = Client(user, f"{user}-pw", device=device, port=port, store=str(tmp_path / f"{user}.{device}.db"),
                        reconnect_delay=(0.1, 0.5), resend_interval=5.0)
        key = f"{user}.{device}"

        def on_message(m: Message) -> None:
            with lock:
                received[key].append((m.sender, m.body))

        def on_receipt(r: Receipt) -> None:
            if r.status == "sent":
                with lock:
                    sent[user].update(r.ids)

        client.on_message = on_message
        client.on_receipt = on_receipt
        clients.append(client)
        return client

    try:
        senders = {s: make(s, "phone") for s, _ in PAIRS}
        for recipient, devices in RECIPIENT_DEVICES.items():
            for device in devices:
                make(recipient, device)
        for client in clients:
            client.connect()
        expected = {s: [f"{s}-{i:05d}" for i in range(PER_SENDER)] for s, _ in PAIRS}

        def stream(sender: str, recipient: str) -> None:
            for body in expected[sender]:  # the SDK makes the ids; the body carries our numbering
                senders[sender].send(recipient, body)

        threads = [threading.Thread(target=stream, args=pair) for pair in PAIRS]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while sum(len(v) for v in received.values()) < 1500:
            assert time.monotonic() < deadline, "the stream did not get going"
            time.sleep(0.01)
        os.kill(broker.pid, signal.SIGKILL)
        broker.wait(10)
        killed_at = sum(len(v) for v in received.values())
        broker = start_broker(config, data, port)
        for thread in threads:
            thread.join(60)
        deadline = time.monotonic() + 180
        targets = {f"{r}.{d}": s for s, r in PAIRS for d in RECIPIENT_DEVICES[r]}
        while any(len(received[device]) < PER_SENDER for device in targets):
            if time.monotonic() > deadline:
                counts = {d: len(received[d]) for d in targets}
                raise AssertionError(f"not everything arrived: {counts} (killed at {killed_at})")
            time.sleep(0.1)
        for device, sender in targets.items():
            bodies = [body for from_user, body in received[device] if from_user == sender]
            assert bodies == expected[sender], f"{device}: lost, duplicated or reordered messages"
        for sender, _ in PAIRS:
            deadline = time.monotonic() + 30
            while senders[sender].outbox():
                assert time.monotonic() < deadline, f"{sender}: outbox never emptied"
                time.sleep(0.05)
        assert killed_at < 3 * PER_SENDER, "the kill must land mid-stream"
        with lock:  # nothing more arrives late (a duplicate would show here)
            assert all(len(received[d]) == PER_SENDER for d in targets)
    finally:
        for client in clients:
            client.close()
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(15)
        except subprocess.TimeoutExpired:
            broker.kill()
