"""A sans-IO MQTT 3.1.1 core for the server side, in the manner of h11 (docs/MQTT.md, "The sans-IO core").

Bytes in, events out; commands in, bytes out; no sockets, no asyncio, no amqtt, no clock of
its own (the caller passes the time). ``events`` holds the packets as slots dataclasses,
``codec`` frames and decodes them from a receive buffer, ``encoding`` turns them into bytes, ``connection``
holds the rules of one connection (``ServerConnection``), ``errors`` what ends one, and
``limits`` the configured bounds.
"""
