"""API keys: ``hf_<prefix>_<secret>``. Only a keyed hash is stored.

The prefix is the lookup id (it is shown in listings and used to revoke); the secret is hashed
with HMAC-SHA256 under the server secret, so a leaked database does not yield usable keys, and it
is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_RE = re.compile(r"^hf_([a-z0-9]{12})_([A-Za-z0-9_-]{32,64})$")


@dataclass(frozen=True)
class NewKey:
    prefix: str
    secret_hash: str
    plaintext: str


def _hash(server_secret: bytes, secret: str) -> str:
    return hmac.new(server_secret, secret.encode(), hashlib.sha256).hexdigest()


def new_key(server_secret: bytes) -> NewKey:
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return NewKey(prefix, _hash(server_secret, secret), f"hf_{prefix}_{secret}")


def parse_key(key: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None."""
    match = KEY_RE.match(key)
    return (match.group(1), match.group(2)) if match else None


def verify(server_secret: bytes, secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(_hash(server_secret, secret), stored_hash)
