"""One MQTT connection to the chat server, kept up by a network thread.

The thread runs paho's network loop (MQTT 3.1.1, client id ``{user}.{device}``,
clean session), with a fresh paho client for every
connection attempt, and reconnects after a drop with exponential backoff and
jitter. All socket writes happen in this thread. A session is *ready* once the server has
granted the subscription to ``u/{me}/in``: only then are uplink items that
expect an answer published (the server answers only subscribed devices).

QoS (docs/PROTOCOL.md section 3, "QoS"): the inbox is subscribed at QoS 0 and acks go
at QoS 0 -- an item stays staged on the server until its app-level ack, and is sent
again on the next connection, so a PUBACK would add a packet each way and no safety;
everything else is published at QoS 1.

Refusals: bad credentials go through ``LoginPlan`` (a refused device token
falls back to the password once; a refused password is final); an identifier
or protocol refusal is final; anything else (network errors, CONNACK 3) is
retried. A final refusal stops the thread and is reported to the listener.

paho calls the ``_on_*`` methods in the network thread; they never raise and
never wait on the app.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
import threading
from collections import deque
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from chatproto import client_id, inbox_topic
from client_sdk.backoff import Backoff
from client_sdk.errors import (
    CONNACK_PROTOCOL,
    AuthError,
    ConnectError,
    IdentifierRejected,
    connack_error,
)
from client_sdk.login import LoginPlan, Refusal, Secret

log = logging.getLogger(__name__)

SUBACK_FAILURE = 0x80
INBOX_QOS = 0
# No inflight limit: publishes then go on the wire in exactly the order they
# were made (the outbox order, rule 2 of ``outbox``), never held back in
# paho's own queue and released later.
MAX_INFLIGHT = 0
MAX_HELD = 10_000  # uplink items (acks, seen reports) kept for the next session


class State(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    RETRYING = "retrying"
    FAILED = "failed"
    STOPPED = "stopped"


class ConnectionListener(Protocol):
    """What the connection tells its owner. Called in the network thread; must return quickly."""

    def on_ready(self, secret: Secret) -> None: ...

    def on_down(self) -> None: ...

    def on_payload(self, payload: bytes) -> None: ...

    def on_failed(self, error: ConnectError) -> None: ...

    def on_token_refused(self) -> None: ...


class Connection:
    """Call ``start()`` to begin connecting, ``publish()`` from any thread, ``stop()`` once."""

    def __init__(
        self,
        user: str,
        device: str,
        plan: LoginPlan,
        listener: ConnectionListener,
        host: str,
        port: int,
        keepalive: int = 60,
        tls: ssl.SSLContext | None = None,
        transport: Literal["tcp", "websockets"] = "tcp",
        backoff: Backoff | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._user = user
        self._cid = client_id(user, device)
        self._plan = plan
        self._listener = listener
        self._host, self._port, self._keepalive = host, port, keepalive
        self._backoff = backoff or Backoff()
        self._topic = inbox_topic(user)
        self._lock = threading.Lock()
        self._state = State.IDLE
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._secret: Secret | None = None
        self._refusal: int | None = None
        self._sub_mid: int | None = None
        self.last_error: BaseException | None = None
        """The last reason a connection attempt failed (for ConnectTimeout's cause)."""

        self._transport: Literal["tcp", "websockets"] = transport
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._held: deque[tuple[str, bytes, int]] = deque(maxlen=MAX_HELD)
        self._mqtt = self._new_client()

    def _new_client(self) -> mqtt.Client:
        """A fresh paho client: one per connection attempt.

        paho re-sends its un-PUBACKed QoS 1 publishes right after a reconnect's
        CONNACK. The server PUBACKs before a message is durable, so after a
        server crash those would overtake earlier messages that were PUBACKed
        and lost, and break the outbox order; with a fresh client the outbox
        alone decides what is published again, and in which order.
        """
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._cid, clean_session=True,
            protocol=mqtt.MQTTv311, transport=self._transport, reconnect_on_failure=False,
        )
        client.connect_timeout = self._connect_timeout
        client.max_inflight_messages_set(MAX_INFLIGHT)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        if self._transport == "websockets":
            client.ws_set_options(path="/mqtt")
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_socket_open = _no_delay
        # paho writes to the socket from the publishing thread unless it runs
        # its own loop thread or an external loop is registered; two threads
        # writing at once reorder (or interleave) packets. Registering this
        # hook makes publish() only queue: the network thread does all writes.
        client.on_socket_register_write = _network_thread_writes
        return client

    # --- state -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is State.READY

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _set_state(self, state: State) -> None:
        with self._lock:
            self._state = state

    # --- control ---------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread unless it is running (again after a failure or stop)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._state = State.CONNECTING
            self._backoff.reset()
            self._thread = threading.Thread(target=self._run, name=f"chat-net-{self._cid}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect (queued publishes are written first) and end the network thread."""
        self._stopping.set()
        try:
            self._mqtt.disconnect()
        except Exception:  # already closed: nothing to do
            log.debug("disconnect of %s failed", self._cid, exc_info=True)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._set_state(State.STOPPED)

    def publish(self, topic: str, payload: bytes, hold: bool, qos: int = 1) -> None:
        """Publish at ``qos`` now if a session is ready.

        Otherwise, with ``hold`` the item waits (in memory, the newest
        ``MAX_HELD``) and goes out first thing in the next session; without it
        the item is dropped, for callers that publish again by themselves
        (the outbox, requests) or whose item is stale by then (heartbeats).
        """
        with self._lock:
            if self._state is not State.READY:
                if hold:
                    self._held.append((topic, payload, qos))
                return
            client = self._mqtt
        try:
            client.publish(topic, payload, qos=qos)
        except OSError:  # waking the network thread failed (socket pair closed); the packet is queued
            log.debug("%s: publish wake-up failed", self._cid, exc_info=True)

    # --- the network thread ------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connect_loop()
        except Exception as exc:  # a bug must not kill the thread silently
            log.exception("network thread of %s failed", self._cid)
            self._fail(ConnectError(f"the network thread failed: {exc!r}"))

    def _connect_loop(self) -> None:
        while not self._stopping.is_set():
            secret = self._plan.next()
            if secret is None:
                self._fail(AuthError("no password and no device token to log in with"))
                return
            self._secret, self._refusal, self._sub_mid = secret, None, None
            client = self._new_client()
            with self._lock:
                self._mqtt = client
            client.username_pw_set(self._user, secret.value)
            try:
                client.connect(self._host, self._port, self._keepalive)
            except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
                self.last_error = exc
                log.info("%s: cannot reach %s:%d: %s", self._cid, self._host, self._port, exc)
                self._pause()
                continue
            if self._stopping.is_set():
                client.disconnect()
            try:
                # loop() rather than loop_forever(): only loop() sets up the
                # socket pair through which a publish from another thread wakes
                # the network thread at once.
                while client.loop(timeout=1.0) == mqtt.MQTT_ERR_SUCCESS:
                    pass
            except Exception as exc:  # paho raises on some socket/TLS failures
                self.last_error = exc
                log.info("%s: connection failed: %r", self._cid, exc)
            if self._stopping.is_set():
                break
            if self._refusal is not None:
                retry_now = self._after_refusal(secret, self._refusal)
                if retry_now is None:
                    return
                if retry_now:
                    continue
            self._pause()
        self._set_state(State.STOPPED)

    def _after_refusal(self, secret: Secret, code: int) -> bool | None:
        """None if the refusal is final (reported); True to try again at once, False after a pause."""
        error = connack_error(code)
        self.last_error = error
        if isinstance(error, AuthError):
            if self._plan.refused(secret) is Refusal.RETRY_NOW:
                log.info("%s: device token refused; logging in with the password", self._cid)
                self._listener.on_token_refused()
                return True
            self._fail(error)
            return None
        if isinstance(error, IdentifierRejected) or error.code == CONNACK_PROTOCOL:
            self._fail(error)
            return None
        return False

    def _pause(self) -> None:
        if self._state is not State.FAILED:
            self._set_state(State.RETRYING)
        self._stopping.wait(self._backoff.next())

    def _fail(self, error: ConnectError) -> None:
        log.warning("%s: not connecting again: %s", self._cid, error)
        self.last_error = error
        self._set_state(State.FAILED)
        self._stopping.set()
        self._listener.on_failed(error)

    # --- paho callbacks (network thread) -------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        try:
            if reason.is_failure:
                self._refusal = int(reason.value)
                client.disconnect()
                return
            result, mid = client.subscribe(self._topic, qos=INBOX_QOS)
            self._sub_mid = mid
            if result != mqtt.MQTT_ERR_SUCCESS:
                log.info("%s: subscribe failed to go out (%s)", self._cid, result)
        except Exception:
            log.exception("%s: on_connect failed", self._cid)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        try:
            if mid != self._sub_mid:
                return
            if any(int(getattr(c, "value", c)) >= SUBACK_FAILURE for c in codes):
                self._fail(ConnectError(f"the server refused the subscription to {self._topic}"))
                client.disconnect()
                return
            secret = self._secret
            if secret is None:
                return
            with self._lock:  # held items go first, before anything published from now on
                while self._held:
                    topic, payload, qos = self._held.popleft()
                    client.publish(topic, payload, qos=qos)
                self._state = State.READY
            self._backoff.reset()
            self._listener.on_ready(secret)
        except Exception:
            log.exception("%s: on_subscribe failed", self._cid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            if message.topic == self._topic:
                self._listener.on_payload(bytes(message.payload))
        except Exception:
            log.exception("%s: handling a downlink item failed", self._cid)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        try:
            was_ready = self._state is State.READY
            if self._state is not State.FAILED:
                self._set_state(State.STOPPED if self._stopping.is_set() else State.RETRYING)
            if was_ready:
                log.info("%s: disconnected (%s)", self._cid, reason)
                self._listener.on_down()
        except Exception:
            log.exception("%s: on_disconnect failed", self._cid)


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Turn Nagle off: an ack published right after a PUBACK must not wait for a delayed TCP ACK."""
    try:
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        log.debug("cannot set TCP_NODELAY", exc_info=True)


def _network_thread_writes(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Registered as ``on_socket_register_write``: nothing to do, see ``Connection.__init__``."""
