"""API keys and session tokens: format, checksum, and keyed digests.

A credential is `<prefix><secret><checksum>`: a visible type prefix, 32 base62
characters of CSPRNG secret (~190 bits) and 6 base62 characters of CRC32 over
prefix and secret, so a malformed credential is refused before any lookup and
secret scanners can recognise ours. Only HMAC-SHA256(pepper, credential) is
stored; argon2 would make every API call a denial-of-service lever.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass

from services.common.errors import Unauthenticated

ALPHABET = string.digits + string.ascii_letters  # base62
SECRET_CHARS = 32
CHECKSUM_CHARS = 6
USER_KEY_PREFIX = "ty_sk_"
SERVICE_KEY_PREFIX = "ty_svc_"
SESSION_PREFIX = "ty_sess_"
PREFIXES = (USER_KEY_PREFIX, SERVICE_KEY_PREFIX, SESSION_PREFIX)
MAX_CREDENTIAL_CHARS = 256


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def checksum(body: str) -> str:
    """CRC32 of `body` in 6 base62 characters."""
    return _base62(zlib.crc32(body.encode()), CHECKSUM_CHARS)


def generate(prefix: str) -> str:
    """A new credential with `prefix`: secret from the OS CSPRNG plus checksum."""
    body = prefix + "".join(secrets.choice(ALPHABET) for _ in range(SECRET_CHARS))
    return body + checksum(body)


@dataclass(frozen=True)
class Parsed:
    """A well-formed credential: its prefix and the full text."""

    prefix: str
    text: str


def parse(credential: str) -> Parsed:
    """Check shape and checksum; raise Unauthenticated (one message) when wrong."""
    if len(credential) > MAX_CREDENTIAL_CHARS:
        raise Unauthenticated(reason="MALFORMED_CREDENTIAL")
    prefix = next((p for p in PREFIXES if credential.startswith(p)), None)
    if prefix is None or len(credential) != len(prefix) + SECRET_CHARS + CHECKSUM_CHARS:
        raise Unauthenticated(reason="MALFORMED_CREDENTIAL")
    rest = credential[len(prefix) :]
    if any(c not in ALPHABET for c in rest):
        raise Unauthenticated(reason="MALFORMED_CREDENTIAL")
    body, check = credential[:-CHECKSUM_CHARS], credential[-CHECKSUM_CHARS:]
    if not hmac.compare_digest(checksum(body), check):
        raise Unauthenticated(reason="MALFORMED_CREDENTIAL")
    return Parsed(prefix, credential)


def digest(pepper: str, credential: str) -> str:
    """HMAC-SHA256(pepper, credential) as hex: what the database stores."""
    return hmac.new(pepper.encode(), credential.encode(), hashlib.sha256).hexdigest()


def hint(credential: str) -> str:
    """What listings show: the prefix and the last four characters."""
    prefix = next((p for p in PREFIXES if credential.startswith(p)), "")
    return f"{prefix}…{credential[-4:]}"
