"""Password hashes and device tokens."""

from broker import credentials as c


def test_password_hash_verifies_and_is_salted() -> None:
    first, second = c.hash_password("s3cret"), c.hash_password("s3cret")
    assert first != second and first.startswith("scrypt$14$8$1$")
    assert c.verify_password("s3cret", first)
    assert not c.verify_password("s3cret ", first)
    assert not c.verify_password("", first)


def test_malformed_or_oversized_inputs_fail_closed() -> None:
    good = c.hash_password("pw")
    assert not c.verify_password("pw", "garbage")
    assert not c.verify_password("pw", good.replace("scrypt", "md5"))
    assert not c.verify_password("x" * (c.MAX_PASSWORD_BYTES + 1), good)


def test_tokens_are_bound_to_user_device_and_secret() -> None:
    secret, other_secret = c.new_server_secret(), c.new_server_secret()
    token = c.new_device_token()
    assert c.looks_like_token(token) and not c.looks_like_token("hunter2")
    digest = c.token_digest(secret, "alice", "phone", token)
    assert token not in digest
    assert c.token_matches(secret, "alice", "phone", token, digest)
    assert not c.token_matches(secret, "alice", "laptop", token, digest)
    assert not c.token_matches(secret, "bob", "phone", token, digest)
    assert not c.token_matches(other_secret, "alice", "phone", token, digest)
    assert not c.token_matches(secret, "alice", "phone", c.new_device_token(), digest)
