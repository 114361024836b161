"""A send-only SDK client in its own process, so a scenario can SIGKILL it with messages in its outbox.

    python -m bench.chaos.child USER PASSWORD PORT STORE TO START COUNT RATE

Sends bodies ``"{USER}:{n}"`` for n in START..COUNT-1 to TO at RATE per second and
reports on stdout, one line each, flushed: ``I n`` just before ``send()``, ``A n id``
once it returned (the message is in the durable outbox), ``S id,id`` for ``sent``
receipts, and ``DONE`` once everything was sent and the outbox is empty. Then it
keeps running (receipts, resends) until SIGTERM. A restart on the same STORE
re-sends what the killed one left in its outbox.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from client_sdk import Client
from client_sdk.events import Receipt


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    user, pw, port, store, to, start, count, rate = argv
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = Client(user, pw, device="phone", port=int(port), store=store, resend_interval=2.0,
                    reconnect_delay=(0.05, 1.0))

    def receipt(r: Receipt) -> None:
        if r.status == "sent":
            say("S " + ",".join(r.ids))

    client.on_receipt = receipt
    client.connect(timeout=120)
    interval = 1.0 / float(rate)
    for n in range(int(start), int(count)):
        if stop.is_set():
            break
        say(f"I {n}")
        say(f"A {n} {client.send(to, f'{user}:{n}')}")
        time.sleep(interval)
    while client.outbox() and not stop.is_set():
        time.sleep(0.1)
    say("DONE")
    stop.wait()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
