"""Which secret to log in with: the device token or the password. Pure.

Rules:
1. Present the device token if the device has one, else the password.
2. A refused token is dropped (the caller forgets it in the store too) and the
   password is tried next, at once: the fallback happens once per refusal.
3. A refused password is final (``AuthError``): retrying a wrong password only
   gets the account throttled.
4. After a login with the password, the caller requests a new device token
   (``auth.token``) and hands it to ``token_issued``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

TOKEN: Literal["token"] = "token"  # noqa: S105 (a kind of secret, not a secret)
PASSWORD: Literal["password"] = "password"  # noqa: S105 (a kind of secret, not a secret)


@dataclass(frozen=True, slots=True)
class Secret:
    value: str
    kind: Literal["token", "password"]

    def __repr__(self) -> str:  # never show the secret in logs or tracebacks
        return f"Secret(kind={self.kind!r})"


class Refusal(enum.Enum):
    RETRY_NOW = "retry_now"
    """The token was refused and dropped: try again with the password."""
    FINAL = "final"
    """The password was refused: give up."""


class LoginPlan:
    def __init__(self, password: str | None, token: str | None) -> None:
        self._password = password
        self._token = token

    @property
    def token(self) -> str | None:
        return self._token

    def next(self) -> Secret | None:
        """Rule 1; None when there is neither a token nor a password."""
        if self._token is not None:
            return Secret(self._token, TOKEN)
        if self._password is not None:
            return Secret(self._password, PASSWORD)
        return None

    def accepted(self, secret: Secret) -> bool:
        """The server accepted ``secret``; True if a new device token should be requested (rule 4)."""
        return secret.kind == PASSWORD

    def refused(self, secret: Secret) -> Refusal:
        """The server refused ``secret`` as bad credentials (rules 2 and 3)."""
        if secret.kind == TOKEN and self._token == secret.value:
            self._token = None
            return Refusal.RETRY_NOW if self._password is not None else Refusal.FINAL
        return Refusal.FINAL

    def token_issued(self, token: str) -> None:
        self._token = token
