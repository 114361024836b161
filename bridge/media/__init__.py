"""Media messages (docs/MEDIA.md): encrypted attachments uploaded over HTTP, stored once, and
deleted when every recipient device has fetched them or their time is up. ``core`` holds the
rules, ``service`` the shell, ``store`` the metadata Protocol, ``blobs`` the bytes' Protocol."""
