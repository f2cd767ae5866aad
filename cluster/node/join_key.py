"""The node's join key: how a node proves it is the workload a ticket was minted for.

A ticket sits in the workload's env, which Hypercore's List shows to anyone who can reach it, so
the ticket alone cannot decide who gets the Ray token (``docs/join.md``). The node agent generates
a key pair at boot, in memory only (never in env, never on disk), and prints the signing key's
fingerprint to its console (``console_line``), which only the workload itself writes and
Hypercore's ``Logs`` returns. Its join request is signed with that key (``signed_request``); the
head redeems the ticket only for a key whose fingerprint the instance's own console shows, and
answers with the token sealed to the node's encryption key (``seal`` / ``NodeKey.open``), so that a
reader of the answer learns nothing.

Primitives, all from ``cryptography``: Ed25519 signs the request; the token is sealed ECIES-style
with an ephemeral X25519 key, HKDF-SHA256 and AES-256-GCM, the instance id as associated data. The
fingerprint is OpenSSH's form, ``SHA256:`` and the unpadded base64 of the SHA-256 of the raw
Ed25519 public key. The signed bytes are a fixed-order, newline-separated record under a protocol
label, so no JSON canonicalisation is involved.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hyperfleet.errors import HyperfleetError

PROTOCOL = "hyperfleet-join-v1"
CONSOLE_MARKER = "HYPERFLEET-JOIN-KEY"
# A fingerprint line counts only at the start of a console line, alone on it.
FINGERPRINT_LINE = re.compile(
    rf"^{CONSOLE_MARKER} (SHA256:[A-Za-z0-9+/]{{43}})[ \t\r]*$", re.MULTILINE
)
KEY_BYTES = 32
NONCE_BYTES = 16
AES_NONCE_BYTES = 12
MAX_CLOCK_SKEW_S = 300.0


class JoinKeyError(HyperfleetError):
    """A signature, a key or a sealed token did not check out."""

    status_code = 401
    error_type = "bad_signature"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: str, length: int | None = None) -> bytes:
    """Decodes unpadded URL-safe base64; raises ``JoinKeyError`` on junk or a wrong length."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise JoinKeyError("not base64") from e
    if length is not None and len(data) != length:
        raise JoinKeyError(f"expected {length} bytes, got {len(data)}")
    return data


def fingerprint(signing_public_key: bytes) -> str:
    """OpenSSH's fingerprint of a raw Ed25519 public key: ``SHA256:<base64, no padding>``."""
    digest = hashlib.sha256(signing_public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def console_line(fingerprint_: str) -> str:
    """The line the node agent prints to its console, which the head finds through ``Logs``."""
    return f"{CONSOLE_MARKER} {fingerprint_}"


def fingerprints_in(console: str) -> set[str]:
    """Every fingerprint a console shows on a line of its own."""
    return set(FINGERPRINT_LINE.findall(console))


@dataclass(frozen=True)
class JoinClaim:
    """What a join request asserts, all of it covered by the signature."""

    ticket: str
    instance_id: str
    signing_key: str  # b64 raw Ed25519 public key
    encryption_key: str  # b64 raw X25519 public key
    timestamp: int  # seconds since the epoch, at the node
    nonce: str  # b64 random bytes

    def signed_bytes(self) -> bytes:
        fields = (
            PROTOCOL,
            self.ticket,
            self.instance_id,
            self.signing_key,
            self.encryption_key,
            str(self.timestamp),
            self.nonce,
        )
        if any("\n" in field for field in fields):
            raise JoinKeyError("a join request field holds a newline")
        return "\n".join(fields).encode()

    @property
    def fingerprint(self) -> str:
        return fingerprint(unb64(self.signing_key, KEY_BYTES))


def verify(claim: JoinClaim, signature: str, now_s: float) -> None:
    """Checks the claim's signature by its own key and its freshness.

    The signature proves the sender holds the private key; whether that key is the instance's
    is the console check's business (the head's ``cluster.join.consoles``).

    Raises:
        JoinKeyError: a bad key, signature or timestamp.
    """
    try:
        public = Ed25519PublicKey.from_public_bytes(unb64(claim.signing_key, KEY_BYTES))
        X25519PublicKey.from_public_bytes(unb64(claim.encryption_key, KEY_BYTES))
    except ValueError as e:  # JoinKeyError is no ValueError: a length or base64 fault passes
        raise JoinKeyError(f"a bad public key in the join request ({e})") from e
    unb64(claim.nonce, NONCE_BYTES)
    try:
        public.verify(unb64(signature, 64), claim.signed_bytes())
    except InvalidSignature as e:
        raise JoinKeyError("the join request's signature does not verify") from e
    if abs(now_s - claim.timestamp) > MAX_CLOCK_SKEW_S:
        raise JoinKeyError(
            f"the join request's timestamp is more than {MAX_CLOCK_SKEW_S:.0f} s off the head's"
            " clock"
        )


def _aead_key(shared: bytes, recipient: bytes, ephemeral: bytes) -> bytes:
    info = f"{PROTOCOL} token".encode() + recipient + ephemeral
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(shared)


def seal(plaintext: bytes, encryption_key: str, associated: str) -> str:
    """``plaintext`` sealed to the holder of ``encryption_key`` (b64 raw X25519), bound to
    ``associated``: ephemeral public key, AES-GCM nonce and ciphertext, base64."""
    recipient = unb64(encryption_key, KEY_BYTES)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    nonce = os.urandom(AES_NONCE_BYTES)
    key = _aead_key(shared, recipient, ephemeral_public)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, associated.encode())
    return b64(ephemeral_public + nonce + ciphertext)


class NodeKey:
    """A node's join key pair, made at boot and held in memory only."""

    def __init__(self, signing: Ed25519PrivateKey, encryption: X25519PrivateKey) -> None:
        self._signing = signing
        self._encryption = encryption
        self.signing_public = signing.public_key().public_bytes_raw()
        self.encryption_public = encryption.public_key().public_bytes_raw()
        self.fingerprint = fingerprint(self.signing_public)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def claim(self, ticket: str, instance_id: str, now_s: float) -> JoinClaim:
        return JoinClaim(
            ticket=ticket,
            instance_id=instance_id,
            signing_key=b64(self.signing_public),
            encryption_key=b64(self.encryption_public),
            timestamp=int(now_s),
            nonce=b64(secrets.token_bytes(NONCE_BYTES)),
        )

    def signed_request(self, ticket: str, instance_id: str, now_s: float) -> dict[str, object]:
        """The join request's JSON body: the claim and its signature."""
        claim = self.claim(ticket, instance_id, now_s)
        signature = self._signing.sign(claim.signed_bytes())
        return {**claim.__dict__, "signature": b64(signature)}

    def open(self, sealed: str, associated: str) -> bytes:
        """The plaintext of ``seal(..., associated)`` to this key.

        Raises:
            JoinKeyError: not sealed to this key, or not for ``associated``.
        """
        data = unb64(sealed)
        if len(data) < KEY_BYTES + AES_NONCE_BYTES + 16:
            raise JoinKeyError("the sealed token is too short")
        ephemeral_public = data[:KEY_BYTES]
        nonce = data[KEY_BYTES : KEY_BYTES + AES_NONCE_BYTES]
        try:
            shared = self._encryption.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        except ValueError as e:  # a low-order point: no shared key
            raise JoinKeyError("the sealed token carries no usable key") from e
        key = _aead_key(shared, self.encryption_public, ephemeral_public)
        try:
            return AESGCM(key).decrypt(
                nonce, data[KEY_BYTES + AES_NONCE_BYTES :], associated.encode()
            )
        except InvalidTag as e:
            raise JoinKeyError("the sealed token does not open with this node's key") from e
