"""Client SDK for the chat broker. ``protocol`` is the wire contract shared with the server."""
