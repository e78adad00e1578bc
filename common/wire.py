"""The wire contract between agent and server, written once and imported by both.

Everything that crosses the network is defined here: the join string, the HTTP paths,
the request and response messages and their validation, the roles, and the CA pin.
A message is a dataclass; `parse(cls, obj)` turns untrusted JSON into one or raises
`WireError` naming the field that is wrong, so both sides refuse bad input in the
same words.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PUBLIC_KEY_TYPES

# 2: check-in answers carry `server_urls`.
# 3: a check-in is a heartbeat (`report_digest` only) unless the report changed; answers
#    carry `report_digest` and `send_report`.
# 4: answers carry `reconnect_window`.
# 5: answers carry `tunnel`.
PROTOCOL_VERSION = 5
OLDEST_PROTOCOL = 1  # the oldest agents this server still serves

CA_PATH = "/v1/ca"
ENROLL_PATH = "/v1/enroll"
CHECKIN_PATH = "/v1/checkin"
RENEW_PATH = "/v1/renew"
OPENAPI_PATH = "/v1/openapi.json"  # this contract as an OpenAPI document (server/openapi.py)

# A check-in with host facts is a few KiB; nothing legitimate comes near this.
MAX_BODY_BYTES = 256 * 1024
MAX_TEXT = 256  # default bound for a short string field
MAX_PEM = 16 * 1024
# Host facts are a few levels deep; a bound keeps hostile nesting away from every
# recursive walk (json, dataclasses.asdict, the admin views) that would overflow the stack.
MAX_DEPTH = 32

ROLES = ("hypervisor", "disk_operations", "mixed")
# How the server reaches a host's libvirtd: `direct` dials its TLS port; `tunnel` goes
# through the connection the agent keeps open to the server (common/tunnel.py); `auto`
# dials directly and asks for a tunnel when the TLS port cannot be reached.
TRANSPORTS = ("direct", "tunnel", "auto")
ROLE_CAPABILITIES: dict[str, frozenset[str]] = {
    "hypervisor": frozenset({"hypervisor"}),
    "disk_operations": frozenset({"disk_operations"}),
    "mixed": frozenset({"hypervisor", "disk_operations"}),
}


# Usage figures in host facts: they move with every look (free memory, load, free space,
# free hugepages, running domains). A change of them alone is no change of what a host
# offers: the agent does not check in early for one, and the engine API makes no event.
USAGE_KEYS = frozenset({"load", "memory_available", "memory_free", "available", "allocation",
                        "free", "free_hugepages", "running_domains", "domains", "seconds",
                        "available_instances", "last_checkin"})


def steady(value: Any) -> Any:
    """`value` (JSON-like) without its usage figures."""
    if isinstance(value, dict):
        return {k: steady(v) for k, v in value.items() if k not in USAGE_KEYS}
    if isinstance(value, list):
        return [steady(v) for v in value]
    return value


def role_within(role: str, limit: str) -> bool:
    """True when `role` asks for no capability beyond what `limit` grants."""
    return ROLE_CAPABILITIES[role] <= ROLE_CAPABILITIES[limit]


class WireError(ValueError):
    """Input that does not follow the contract; the message names what is wrong."""


# ---------------------------------------------------------------------------
# CA pin and join string


def ca_pin(public_key: PUBLIC_KEY_TYPES) -> str:
    """SHA-256 of the CA's SubjectPublicKeyInfo, as kubeadm's discovery hash."""
    # Imported here: the agent's check-in path does not need it (5 MB of its memory).
    from cryptography.hazmat.primitives import serialization

    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


_REQUIRED: Any = dataclasses.MISSING


def _text(max_len: int = MAX_TEXT, *, choices: tuple[str, ...] = (), default: Any = _REQUIRED,
          name: bool = False) -> Any:
    """A string field with its bounds; required unless a default is given. `name`: a name
    people read in tables (a hostname): no control characters at all."""
    return field(default=default, metadata={"max_len": max_len, "choices": choices, "name": name})


MAX_URLS = 16


def _urls() -> Any:
    """A list of https URLs (at most MAX_URLS), empty by default."""
    return field(default_factory=list, metadata={"max_len": 1024, "max_items": MAX_URLS,
                                                 "url": True})


# What a terminal would act on rather than show: C0 and C1 controls (escape sequences,
# OSC 52 clipboard writes) and the bidirectional overrides that reorder a line.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


JOIN_PREFIX = "vfjoin1."


@dataclass(frozen=True)
class JoinString:
    """What an operator pastes on a host: where the server is, how to trust it, the token."""

    url: str = _text(1024)
    ca_pin: str = _text(71)
    token: str = _text(4096)
    # The other replicas' URLs (server replicas on one database): where `join` goes when
    # `url` does not answer. Left out when empty, so a single server's join strings are
    # what agents of every version read.
    more_urls: list[str] = _urls()

    def encode(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v or k != "more_urls"}
        body = json.dumps(fields, separators=(",", ":")).encode()
        return JOIN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinString:
        text = text.strip()
        if not text.startswith(JOIN_PREFIX):
            raise WireError(
                f"not a virtfleet join string: it must start with {JOIN_PREFIX!r} "
                "(copy the whole line printed by `virtfleet-server token create`)"
            )
        payload = text[len(JOIN_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            obj = load_json(raw, "its payload")
        except (binascii.Error, ValueError) as exc:
            raise WireError(f"join string is damaged (was it cut short?): {exc}") from None
        join = parse(cls, obj)
        for url in (join.url, *join.more_urls):
            _check_url(url)
        if not _PIN.fullmatch(join.ca_pin):
            raise WireError("join string: ca_pin must be 'sha256:' followed by 64 hex digits")
        return join


_PIN = re.compile(r"sha256:[0-9a-f]{64}")


def _check_url(url: str, what: str = "join string: server url") -> None:
    try:
        parts = urlsplit(url)
        usable = parts.scheme == "https" and bool(parts.hostname) and parts.port != 0
    except ValueError:  # "Invalid IPv6 URL", a port out of range
        usable = False
    if not usable:
        raise WireError(f"{what} {url[:100]!r} must be https://HOST[:PORT]")


# ---------------------------------------------------------------------------
# Messages


@dataclass(kw_only=True)
class CaResponse:
    """The identity CA, fetched untrusted before enrolling: the join string's pin vouches for it."""

    ca_certificate: str = _text(MAX_PEM)


@dataclass(kw_only=True)
class LibvirtdHealth:
    """Whether libvirtd on the host answers, with libvirt's own error when it does not."""

    ok: bool
    error: str | None = _text(2048, default=None)
    uri: str | None = _text(default=None)


@dataclass(kw_only=True)
class LibvirtEndpoint:
    """Where the server reaches the host's libvirtd over TLS."""

    host: str = _text()
    port: int = 16514


@dataclass(kw_only=True)
class Report:
    """What the agent says about its host, at enrollment and on every check-in."""

    hostname: str = _text(name=True)
    role: str = _text(choices=ROLES)
    agent_version: str = _text(64)
    libvirtd: LibvirtdHealth
    facts: dict[str, Any] = field(default_factory=dict)
    libvirt_endpoint: LibvirtEndpoint | None = None


@dataclass(kw_only=True)
class EnrollRequest:
    token: str = _text(4096)
    csr: str = _text(MAX_PEM)
    libvirt_csr: str | None = _text(MAX_PEM, default=None)
    report: Report
    protocol: int = PROTOCOL_VERSION


@dataclass(kw_only=True)
class Identity:
    """Certificates the server issued to a host."""

    certificate: str = _text(MAX_PEM)
    ca_certificate: str = _text(MAX_PEM)
    libvirt_certificate: str | None = _text(MAX_PEM, default=None)
    libvirt_ca_certificate: str | None = _text(MAX_PEM, default=None)
    libvirt_client_dn: str | None = _text(1024, default=None)


@dataclass(kw_only=True)
class EnrollResponse:
    host_id: str = _text(64)
    identity: Identity
    checkin_interval: float = 10.0


DIGEST_LENGTH = 32  # hex digits of a report digest (128 bits of SHA-256)


def report_digest(report_text: str) -> str:
    """The digest of a report as the server stores it (its JSON text)."""
    return hashlib.sha256(report_text.encode()).hexdigest()[:DIGEST_LENGTH]


@dataclass(kw_only=True)
class CheckinRequest:
    """A check-in: either the full `report` (when something in it changed, at most a few
    minutes apart otherwise, or when the server asks) or a heartbeat, `report_digest`
    alone: the digest of the last report the server acknowledged (its answer's
    `report_digest`). The heartbeat proves the host alive; its identity is the client
    certificate. Agents of protocol 1 and 2 always send the report."""

    ONE_OF: ClassVar[tuple[str, ...]] = ("report", "report_digest")

    report: Report | None = None
    report_digest: str | None = _text(DIGEST_LENGTH, default=None)
    protocol: int = PROTOCOL_VERSION


@dataclass(kw_only=True)
class CheckinResponse:
    host_id: str = _text(64)
    status: str = _text(32)
    detail: str = _text(2048)
    enabled: bool = False
    role: str = _text(choices=ROLES)
    checkin_interval: float = 10.0
    renew: bool = False
    # Where this server can be reached, best first: an agent whose URL is not among them
    # moves to the first (same CA, so the same trust), so a server can move without
    # every host joining again. With replicas, the others follow: where an agent checks
    # in when this one stops answering.
    server_urls: list[str] = _urls()
    # The digest of the report the server holds for this host: what a heartbeat carries.
    report_digest: str = _text(DIGEST_LENGTH, default="")
    # The heartbeat's digest is not the server's (a restart lost a write, another
    # server): send the full report now.
    send_report: bool = False
    # When a connection to the server fails before any answer (it restarts, it is
    # down), try again at a random moment within this many seconds: about the time the
    # server needs to shake hands with every host, so a crowd cut off together comes
    # back at the pace it can take instead of all at once.
    reconnect_window: float = 0.0
    # Keep a tunnel open to this server: the host's libvirt connections come through it
    # (the host is behind NAT or a firewall, or chose no TLS port); false: close it.
    tunnel: bool = False


# The check-in answer's fields each protocol added: an agent is sent those it knows
# (agents of protocol 1 refuse a field they do not know).
ADDED_IN = {"server_urls": 2, "report_digest": 3, "send_report": 3, "reconnect_window": 4,
            "tunnel": 5}
_NEWEST_FIELD = max(ADDED_IN.values())


def answer_for(protocol: int, answer: dict[str, Any]) -> dict[str, Any]:
    """A check-in answer (as JSON) with only the fields an agent of `protocol` knows."""
    if protocol >= _NEWEST_FIELD:  # a current agent (nearly every check-in): all of them
        return answer
    return {k: v for k, v in answer.items() if ADDED_IN.get(k, 0) <= protocol}


@dataclass(kw_only=True)
class RenewRequest:
    csr: str = _text(MAX_PEM)
    libvirt_csr: str | None = _text(MAX_PEM, default=None)


@dataclass(kw_only=True)
class ErrorBody:
    error: str = _text(64)
    message: str = _text(4096)


# ---------------------------------------------------------------------------
# Validation

T = TypeVar("T")


def parse(cls: type[T], obj: Any, where: str = "", *, ignore_unknown: bool = False,
          stored: bool = False) -> T:
    """Build message `cls` from decoded JSON, checking every field's type and bounds.
    `ignore_unknown`: for answers an agent reads, where a field it does not know is a
    newer server's addition, not an error (the server stays strict with what it accepts).
    `stored`: JSON this program wrote from a message it had checked: the free-form values
    (host facts) are not walked again (that walk was most of reading 10,000 hosts'
    reports at start-up)."""
    if not isinstance(obj, dict):
        raise WireError(f"{where or 'body'}: expected a JSON object, got {_kind(obj)}")
    hints, fields = _schema(cls)
    unknown = sorted(set(obj) - set(fields))
    if unknown and not ignore_unknown:
        # Named back to the sender, so bounded: a refusal must not echo a whole body.
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise WireError(f"{where or 'body'}: unknown field(s) {shown}{more}")
    values = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{path}: required field is missing")
            continue
        values[name] = _value(hints[name], obj[name], path, f.metadata, ignore_unknown, stored)
    one_of = getattr(cls, "ONE_OF", ())
    if one_of and sum(values.get(name) is not None for name in one_of) != 1:
        raise WireError(f"{where or 'body'}: carries either {' or '.join(one_of)} (exactly one)")
    return cls(**values)


_Schema = tuple[dict[str, Any], dict[str, "dataclasses.Field[Any]"]]
_SCHEMAS: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    """A message's field types and fields, resolved once: get_type_hints compiles the
    annotations (strings here) on every call, a third of a check-in's parsing."""
    if cls not in _SCHEMAS:
        _SCHEMAS[cls] = (typing.get_type_hints(cls),
                         {f.name: f for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    return _SCHEMAS[cls]


@functools.cache
def _shape(hint: Any) -> tuple[Any, Any, bool]:
    """(origin, the type within an Optional, is a message) of a field's type, worked out
    once per type: typing's introspection was half of parsing a heartbeat."""
    origin = typing.get_origin(hint)
    inner = None
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
    return origin, inner, dataclasses.is_dataclass(hint)


def _value(hint: Any, value: Any, path: str, meta: Any, ignore_unknown: bool = False,
           stored: bool = False) -> Any:
    origin, inner, message = _shape(hint)
    if inner is not None:
        if value is None:
            return None
        return _value(inner, value, path, meta, ignore_unknown, stored)
    if message:
        return parse(hint, value, path, ignore_unknown=ignore_unknown,  # type: ignore[arg-type]
                     stored=stored)
    if hint is str:
        if not isinstance(value, str):
            raise WireError(f"{path}: expected a string, got {_kind(value)}")
        _check_text(value, path)
        max_len = meta.get("max_len", MAX_TEXT)
        if len(value) > max_len:
            raise WireError(f"{path}: longer than {max_len} characters")
        if meta.get("name") and CONTROL_CHARS.search(value):
            raise WireError(f"{path}: contains control characters")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise WireError(f"{path}: {value[:40]!r} is not one of {', '.join(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise WireError(f"{path}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has one kind of number: 2.0 is the integer 2 (JSON Schema agrees)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise WireError(f"{path}: expected a whole number from 0 to 2^31, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise WireError(f"{path}: expected a number, got {_kind(value)}")
        return float(value)
    if origin is list:
        return _list(typing.get_args(hint)[0], value, path, meta)
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{path}: expected a JSON object, got {_kind(value)}")
        if not stored:
            _check_tree(value, path)
        return value
    raise TypeError(f"wire: no rule for {hint!r} at {path}")  # a bug in this module


def _list(item: Any, value: Any, path: str, meta: Any) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{path}: expected a list, got {_kind(value)}")
    if len(value) > meta.get("max_items", 0):
        raise WireError(f"{path}: more than {meta.get('max_items', 0)} items")
    items = [_value(item, v, f"{path}[{i}]", meta) for i, v in enumerate(value)]
    if meta.get("url"):
        for i, url in enumerate(items):
            _check_url(url, f"{path}[{i}]")
    return items


def _check_text(value: str, path: str) -> None:
    """JSON's \\uXXXX escapes can carry a lone surrogate, which no UTF-8 store, log or
    terminal can take: refuse it here rather than fail later."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise WireError(f"{path}: not valid Unicode text (a lone surrogate escape)") from None


def _check_tree(value: Any, path: str) -> None:
    """A free-form JSON value (host facts): bounded depth and valid text throughout."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise WireError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for key, item in node.items():
                _check_text(key, path)
                stack.append((item, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            _check_text(node, path)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def to_json(message: Any) -> dict[str, Any]:
    """A message as JSON-ready dicts. Unlike dataclasses.asdict it does not deep-copy the
    free-form values (host facts): the result shares them, and nobody mutates either."""
    out = {}
    for name in _schema(type(message))[1]:
        value = getattr(message, name)
        # (is_dataclass, in the same words, cost a fifth of a heartbeat's answer)
        out[name] = to_json(value) if hasattr(value, "__dataclass_fields__") else value
    return out


def decode_body(cls: type[T], raw: bytes, *, ignore_unknown: bool = False) -> T:
    """Parse an HTTP body: size, JSON, then schema."""
    if len(raw) > MAX_BODY_BYTES:
        raise WireError(f"body is {len(raw)} bytes, the limit is {MAX_BODY_BYTES}")
    return parse(cls, load_json(raw, "body"), ignore_unknown=ignore_unknown)


def load_json(raw: bytes, what: str) -> Any:
    """Strict JSON (no NaN or Infinity) from untrusted UTF-8 bytes, or a WireError naming
    `what`."""
    try:
        return _DECODER.decode(raw.decode())
    except RecursionError:
        raise WireError(f"{what} is nested too deeply to be a virtfleet message") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise WireError(f"{what} is not valid JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # made once: json.loads makes one a call
