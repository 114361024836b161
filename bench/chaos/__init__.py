"""Reliability and security harness: faults, floods and hostile input against the real broker and SDK.

``python -m bench chaos [--scenario X] [--full]``; tests/chaos runs the small form.
See bench/README.md ("chaos") and docs/RELIABILITY.md.
"""
