"""Tenants' own Anthropic keys, encrypted at rest in the control store.

An agent spec may carry its owner's ``anthropic_api_key``. The control store keeps specs in
SQLite, and a database file is what leaks (a backup, a copied home, a disk image), so the key is
stored sealed: AES-256-GCM under a key that the control store creates next to its database on
first start (``control.sealing-key``, mode 0600) and that never leaves the control store's
process, like the server secret that API keys are hashed with. The agent's id is the associated
data, so a sealed key copied into another agent's row does not open. A sealed value is
``hfsealed:v1:`` and the URL-safe base64 of the 12-byte nonce and the ciphertext.

Why AES-GCM over Fernet: the same ``cryptography`` package, an authenticated cipher either way,
but GCM takes associated data (the agent id) and Fernet does not.

A spec the control store hands out (``Agent.spec``) never holds the key in any form: its
``anthropic_api_key`` is ``REDACTED``, which says that the agent has a key of its own and is no
key at all. Only ``ControlStore.replica_spec``, for whoever starts a replica, opens it. How the
key reaches a replica, and what is not protected: ``docs/security.md``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any

from hyperfleet.private import create_private

SEALED_PREFIX = "hfsealed:v1:"
REDACTED = "redacted"
KEY_FIELD = "anthropic_api_key"
KEY_BYTES = 32
NONCE_BYTES = 12
_AAD = b"hyperfleet agent anthropic_api_key:"


class SealingError(Exception):
    """A sealed key does not open: the sealing key is another one, or the value was altered."""


class KeySealer:
    """Seals and opens tenants' keys with the key kept at ``key_path`` (created on first use)."""

    def __init__(self, key_path: Path) -> None:
        # Imported here: only the control store seals, and replicas import this package.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        create_private(key_path, secrets.token_bytes(KEY_BYTES))
        key = key_path.read_bytes()
        if len(key) != KEY_BYTES:
            raise SealingError(f"{key_path} is not a {KEY_BYTES}-byte key")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, agent_id: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), _AAD + agent_id.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, stored: str, agent_id: str) -> str:
        """The plaintext of a sealed value; a plaintext one (stored before keys were sealed)
        is returned as it is."""
        if not is_sealed(stored):
            return stored
        from cryptography.exceptions import InvalidTag

        raw = base64.urlsafe_b64decode(stored[len(SEALED_PREFIX) :])
        nonce, sealed = raw[:NONCE_BYTES], raw[NONCE_BYTES:]
        try:
            plain = self._aead.decrypt(nonce, sealed, _AAD + agent_id.encode())
        except InvalidTag as e:
            raise SealingError(f"agent {agent_id}'s Anthropic key does not open") from e
        return plain.decode()

    def seal_spec(self, spec_json: str, agent_id: str) -> str:
        """``spec_json`` with its key sealed (unchanged when it has none, or has it sealed)."""
        spec = _parsed(spec_json)
        key = spec.get(KEY_FIELD)
        if not isinstance(key, str) or is_sealed(key):
            return spec_json
        return json.dumps({**spec, KEY_FIELD: self.seal(key, agent_id)})

    def open_spec(self, spec_json: str, agent_id: str) -> str:
        """``spec_json`` with its key in plaintext: for the replica that calls the model."""
        spec = _parsed(spec_json)
        key = spec.get(KEY_FIELD)
        if not isinstance(key, str):
            return spec_json
        return json.dumps({**spec, KEY_FIELD: self.open(key, agent_id)})


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def redact_spec(spec_json: str) -> str:
    """``spec_json`` with its key, sealed or not, replaced by ``REDACTED``."""
    spec = _parsed(spec_json)
    if spec.get(KEY_FIELD) is None:
        return spec_json
    return json.dumps({**spec, KEY_FIELD: REDACTED})


def _parsed(spec_json: str) -> dict[str, Any]:
    spec = json.loads(spec_json)
    if not isinstance(spec, dict):
        raise ValueError("an agent spec is a JSON object")
    return spec


def seal_plaintext_keys(db: sqlite3.Connection, sealer: KeySealer) -> None:
    """Seals the keys that a version before sealing stored in plaintext in the control store's
    ``agents`` table, once, at start; then truncates the WAL, so that no copy of a plaintext
    page is left in it."""
    rows = db.execute(
        "SELECT id, spec FROM agents WHERE spec LIKE ?", (f'%"{KEY_FIELD}"%',)
    ).fetchall()
    changed = []
    for agent_id, spec in rows:
        sealed = sealer.seal_spec(spec, agent_id)
        if sealed != spec:
            changed.append((sealed, agent_id))
    if not changed:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("UPDATE agents SET spec = ? WHERE id = ?", changed)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
