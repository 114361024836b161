"""The shipped ``config/open-mqtt.yaml``, run the documented way
(``chat-broker run -c config/open-mqtt.yaml --bind ... --data-dir ...``), serves generic
MQTT to third-party tools without an account: mosquitto_pub retains a message
anonymously, mosquitto_sub reads it (MQTT 3.1.1 section 3.3.1.3). Chat topics stay
closed to them: mosquitto_sub's subscription to an inbox is denied (SUBACK 0x80), and a
chat device's client id is refused with "identifier rejected" (CONNACK 0x02).

This checks the example file, not a spec rule, so it has no stock-amqtt run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.mqtt.conftest import OPEN_CONFIG
from tests.test_cli import broker_process
from tests.test_mosquitto_clients import tool

RUN_S = 20.0


def anonymous(name: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [tool(name), "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311", "-q", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_S, check=False)


def test_open_config_serves_anonymous_mosquitto_clients(tmp_path: Path) -> None:
    with broker_process("-c", str(OPEN_CONFIG), "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
                        cwd=tmp_path) as running:
        port = running.port
        published = anonymous("mosquitto_pub", port, "-i", "interop-pub", "-t", "interop/hello", "-m", "hi", "-r")
        assert published.returncode == 0, published.stderr
        read = anonymous("mosquitto_sub", port, "-i", "interop-sub", "-t", "interop/#", "-v", "-C", "1", "-W", "10")
        assert (read.returncode, read.stdout.strip()) == (0, "interop/hello hi"), read.stderr

        denied = anonymous("mosquitto_sub", port, "-i", "interop-spy", "-t", "u/alice/in", "-C", "1", "-W", "5")
        assert "all subscription requests were denied" in denied.stderr.lower(), (denied.returncode, denied.stderr)

        thief = anonymous("mosquitto_pub", port, "-i", "alice.phone", "-t", "interop/x", "-m", "x")
        assert thief.returncode != 0 and "identifier rejected" in thief.stderr.lower(), (thief.returncode, thief.stderr)
        assert running.stop() == 0
