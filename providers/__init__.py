"""Clients of the external services the server calls (push now): implementations of the bridge's
provider Protocols, as storage/ implements its store Protocols. Imported only by the wiring."""
