"""Settings: embedded defaults, the shipped YAML, and one-line errors naming the key."""

import re
from pathlib import Path

import pytest

from chatserver.binds import parse_bind
from chatserver.config import ConfigError, Settings, build_settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_equals_embedded_defaults() -> None:
    assert load_settings(ROOT / "config" / "broker.yaml") == Settings()
    assert Settings().listeners.tcp.bind == "127.0.0.1:1883"


def test_overrides_apply() -> None:
    s = load_settings(None, {"data_dir": "/tmp/x", "listeners.tcp.bind": "127.0.0.1:0"})
    assert s.data_dir == "/tmp/x" and s.listeners.tcp.bind == "127.0.0.1:0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listeners:\n  tcp:\n    bnd: 1\n", "listeners.tcp.bnd: unknown key"),
        ("auth:\n  free_failures: '3'\n", "auth.free_failures: Input should be a valid integer"),
        ("limits:\n  max_body_bytes: true\n", "limits.max_body_bytes: Input should be a valid integer"),
        ("listeners:\n  tcp:\n    bind: nope\n", "listeners.tcp.bind:"),
        ("log:\n  level: loud\n", "log.level:"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("a: [\n", "not valid YAML at line"),
        ("listeners:\n  tcp: {proxy_protocol: true}\n", "listeners.trusted_proxies must name it"),
        ("listeners:\n  trusted_proxies: [10.0.0.1/8]\n  ws: {proxy_protocol: true}\n",
         "listeners.ws.proxy_protocol does not apply to ws: use listeners.ws.forwarded_for"),
        ("listeners:\n  trusted_proxies: [10.0.0.1]\n  tls: {forwarded_for: true}\n",
         "use listeners.tls.proxy_protocol"),
        ("listeners:\n  trusted_proxies: [10.0.0.0/33]\n", "listeners.trusted_proxies: '10.0.0.0/33' is not"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_settings(tmp_path / "nope.yaml")


def test_parse_bind() -> None:
    assert parse_bind("127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_bind("[::1]:8883") == ("::1", 8883)
    for bad in ("1883", ":1883", "host:", "host:70000", "host:x"):
        with pytest.raises(ValueError):
            parse_bind(bad)


@pytest.mark.parametrize(("media", "message"), [
    ({"bind": "127.0.0.1:0", "certfile": "c.pem"}, "media: certfile and keyfile go together"),
    ({"backend": "s3"}, "media.backend is s3: the media.s3 section (bucket, ...) is required"),
    ({"s3": {"bucket": "b", "access_key_id": "k"}}, "media.s3: access_key_id and secret_access_key_file go together"),
    ({"chunk_max_bytes": 11, "max_bytes": 10}, "media.chunk_max_bytes must be at most media.max_bytes"),
    ({"bind": "nowhere"}, "is not HOST:PORT"),
    ({"quota": 1}, "unknown key"),
])
def test_media_settings_are_checked(media: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_settings({"media": media})


def test_media_in_cluster_mode_needs_s3() -> None:
    cluster = {"redis": ["127.0.0.1:7000"]}
    with pytest.raises(ConfigError, match=r"set media\.backend: s3"):
        build_settings({"media": {"bind": "127.0.0.1:0"}, "cluster": cluster})
    media = {"bind": "127.0.0.1:0", "backend": "s3", "s3": {"bucket": "chat"}}
    assert build_settings({"media": media, "cluster": cluster}).media.backend == "s3"
    assert build_settings({"media": {"backend": "local"}, "cluster": cluster}).media.bind is None  # no endpoint: fine
    s3 = build_settings({"media": {"backend": "s3", "s3": {"bucket": "b", "prefix": "chat/"}}}).media.s3
    assert s3 is not None and (s3.bucket, s3.prefix, s3.endpoint_url) == ("b", "chat/", None)
