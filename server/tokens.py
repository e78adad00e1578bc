"""Join tokens: JWTs signed with the server's Ed25519 key (PyJWT, algorithm pinned).

The token proves what the server allowed (role limit, auto-enable, expiry); use counts
and revocation live in the store, keyed by the token id (`jti`), so a token can be
revoked or used up although its signature stays valid.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import wire
from common.files import write_atomic

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
AUDIENCE = "virtfleet-enroll"
ISSUER = "virtfleet-server"


class TokenError(ValueError):
    """A join token that does not let anyone enroll; the message says why."""


@dataclass(frozen=True)
class TokenClaims:
    jti: str
    role: str
    auto_enable: bool
    expires_at: float
    transport: str = "direct"


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        return load_signing_key(path.read_bytes(), str(path))
    pem = new_signing_key_pem()
    write_atomic(path, pem, mode=0o600)
    log.info("created token-signing key %s", path)
    return load_signing_key(pem, str(path))


def new_signing_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_signing_key(pem: bytes, where: str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{where}: expected an Ed25519 private key")
    return key


class TokenSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public = key.public_key()

    def create(self, role: str, ttl: dt.timedelta, auto_enable: bool,
               transport: str = "auto") -> tuple[str, TokenClaims]:
        now = dt.datetime.now(dt.UTC)
        claims = TokenClaims(
            jti=secrets.token_hex(8),
            role=role,
            auto_enable=auto_enable,
            expires_at=(now + ttl).timestamp(),
            transport=transport,
        )
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "jti": claims.jti,
            "iat": int(now.timestamp()),
            "exp": int(claims.expires_at),
            "role": role,
            "auto_enable": auto_enable,
            "transport": transport,
        }
        return jwt.encode(payload, self._key, algorithm=ALGORITHM), claims  # type: ignore[arg-type]

    def verify(self, token: str) -> TokenClaims:
        """Signature, algorithm, audience, issuer and expiry; use count is the store's job."""
        try:
            payload = jwt.decode(
                token,
                self._public,  # type: ignore[arg-type]
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "jti", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("join token has expired: create a new one with "
                             "`virtfleet-server token create`") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError(f"join token is not signed with {ALGORITHM}: refused") from None
        except jwt.InvalidSignatureError:
            raise TokenError("join token signature is not valid: it was not issued by this "
                             "server or it was altered") from None
        except jwt.InvalidAudienceError:
            raise TokenError("join token is not meant for enrollment (wrong audience)") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"join token is not valid: {exc}") from None
        except (TypeError, ValueError, OverflowError):
            # PyJWT 2.6 lets some malformed input escape as plain errors: a lone surrogate
            # in the token, `"iat": "1"`, `"exp": Infinity`.
            raise TokenError("join token is not valid: it is not a well-formed JWT") from None
        role = payload.get("role")
        if role not in wire.ROLES or not isinstance(payload.get("auto_enable"), bool):
            raise TokenError("join token lacks a valid role or auto_enable claim")
        transport = payload.get("transport", "direct")  # tokens from before it was a claim
        if transport not in wire.TRANSPORTS:
            raise TokenError("join token's transport claim is not one of "
                             f"{', '.join(wire.TRANSPORTS)}")
        return TokenClaims(
            jti=str(payload["jti"]),
            role=role,
            auto_enable=payload["auto_enable"],
            expires_at=float(payload["exp"]),
            transport=transport,
        )
