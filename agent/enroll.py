"""Joining a server: trust it by the pin, enroll with the token, save the identity.

1. decode the join string (server URL, CA pin, token), and choose the role: the one
   given, else (join --force) the one the host joined with, else the token's own;
2. fetch the server's CA without trusting anything, and accept it only if its public
   key hashes to the pin: a wrong server or a man in the middle stops here;
3. make the host's keys locally, then enroll over TLS that trusts only that CA;
4. install libvirtd's TLS files, then save the identity (agent.json last).
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
import time

from agent.client import Connection, ServerError, call, fetch_ca
from agent.config import AgentConfig
from agent.libvirt_tls import LibvirtTLS, TLSSetupError
from agent.local_libvirt import LocalLibvirt
from agent.report import build_report
from agent.state import Enrollment, State
from common import pki, wire
from common.backoff import Backoff
from common.logs import event

log = logging.getLogger(__name__)


BUSY_PATIENCE = 120.0  # how long `join` keeps retrying a server that says it is busy


class JoinError(Exception):
    """Joining failed; the message says why and what to do."""


def check_pin(ca_pem: str, expected: str, url: str, source: str = "the join string",
              unchanged: str = "Nothing was enrolled.") -> None:
    try:
        actual = wire.ca_pin(pki.load_cert(ca_pem).public_key())
    except ValueError:
        raise JoinError(f"{url} sent a CA certificate that cannot be read") from None
    if actual != expected:
        raise JoinError(
            f"the server at {url} presented a CA with pin {actual}, but {source} "
            f"expects {expected}: refusing to trust it. Either this is not the server that "
            f"made the token, or someone is in between. {unchanged}")


def _claim(token: str, name: str, choices: tuple[str, ...]) -> str | None:
    """A claim of a join token (a JWT), read without checking the signature: it only
    picks a default the server then checks, with the signature, as always."""
    try:
        payload = token.split(".")[1]
        claims = wire.load_json(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)),
                                "the token")
    except (IndexError, ValueError, binascii.Error):
        return None
    value = claims.get(name) if isinstance(claims, dict) else None
    return value if value in choices else None


def token_role(token: str) -> str | None:
    return _claim(token, "role", wire.ROLES)


def token_transport(token: str) -> str:
    """How the server will reach this host: a `tunnel` host sets no libvirtd TLS up."""
    return _claim(token, "transport", wire.TRANSPORTS) or "direct"


def choose_role(given: str, token_limit: str | None, joined: str | None) -> str:
    """The role to enroll with: the one given (agent.toml or --role), else the one this
    host joined with before (join --force) while the token allows it, else the token's;
    "mixed" if none says."""
    if given:
        return given
    if joined and (not token_limit or wire.role_within(joined, token_limit)):
        return joined
    if joined:
        log.warning("this host joined with role %r, which this token does not allow: it takes "
                    "the token's, %r (give --role to choose)", joined, token_limit)
    return token_limit or "mixed"


async def check_server(url: str, ca_pin: str) -> None:
    """Whether `url` serves the CA with `ca_pin` (set-server: the same server, elsewhere)."""
    try:  # the URL rule join strings follow
        wire.JoinString.decode(wire.JoinString(url=url, ca_pin=ca_pin, token="-").encode())
    except wire.WireError as exc:
        raise JoinError(str(exc).replace("join string: ", "")) from None
    try:
        ca_pem = await fetch_ca(url)
    except ServerError as exc:
        raise JoinError(str(exc)) from None
    check_pin(ca_pem, ca_pin, url, "this host's agent.json (the CA it joined)",
              "Nothing was changed.")


async def first_answering(join_string: wire.JoinString) -> tuple[str, str]:
    """The first of the join string's URLs whose server answers, and its CA: a replica
    down at join time is passed over (one that answers with a refusal is not)."""
    *others, last = [join_string.url, *join_string.more_urls]
    for url in others:
        try:
            return url, await fetch_ca(url)
        except ServerError as exc:
            if exc.status is not None:
                raise JoinError(str(exc)) from None
            log.warning("%s does not answer (%s): trying the next replica", url, exc)
    try:
        return last, await fetch_ca(last)
    except ServerError as exc:
        raise JoinError(str(exc)) from None


async def join(text: str, config: AgentConfig, state: State, force: bool = False) -> Enrollment:
    try:
        join_string = wire.JoinString.decode(text)
    except wire.WireError as exc:
        raise JoinError(str(exc)) from None
    current = state.enrolled()
    if current and not force:
        raise JoinError(f"already enrolled as host {current.host_id} with {current.server_url}; "
                        "use --force to join again with a new identity")
    config.role = choose_role(config.role, token_role(join_string.token),
                              current.role if current else None)
    if current and current.hostname and not config.hostname_given:
        config.hostname = current.hostname  # a re-join keeps the name, as it keeps the role
    url, ca_pem = await first_answering(join_string)
    check_pin(ca_pem, join_string.ca_pin, url)

    # Through a tunnel, the server reaches libvirtd's unix socket: no TLS listener to set
    # up, and no libvirtd restart.
    set_up_tls = config.libvirt.configure_tls and token_transport(join_string.token) != "tunnel"
    if set_up_tls:
        LibvirtTLS(config.libvirt, state.dir).preflight()
    state.prepare()
    key = pki.new_key()
    libvirt_key = pki.new_key() if set_up_tls else None
    local = LocalLibvirt(config.libvirt.uri, on_change=lambda: None)
    try:
        report = await build_report(config, local)
    finally:
        local.close()
    request = wire.EnrollRequest(
        token=join_string.token,
        csr=pki.make_csr(key, config.hostname),
        libvirt_csr=pki.make_csr(libvirt_key, config.hostname) if libvirt_key else None,
        report=report,
    )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    if current and current.ca_pin == join_string.ca_pin and state.identity_expiry() > time.time():
        # Joining the same server again: the host shows who it is, so the server gives it
        # the new identity in place (same id, same history) instead of a second host.
        ctx.load_cert_chain(state.identity)
    answer = await enroll_request(url, request, ctx)
    replicas = [url, *(u for u in (join_string.url, *join_string.more_urls) if u != url)]
    enrollment = Enrollment(host_id=answer.host_id, server_url=url,
                            ca_pin=join_string.ca_pin, role=config.role, enrolled_at=time.time(),
                            hostname=config.hostname,
                            replica_urls=replicas if join_string.more_urls else [])
    state.save_enrollment(enrollment, pki.key_pem(key), answer.identity.certificate,
                          answer.identity.ca_certificate)
    event(log, "enrolled", "enrolled with %s as host %s (role %s)", url,
          answer.host_id, config.role, host_id=answer.host_id)
    if libvirt_key is not None:
        try:
            install_libvirt_tls(config, state, libvirt_key, answer.identity)
        except TLSSetupError as exc:
            raise JoinError(f"enrolled as host {answer.host_id}, but libvirtd's TLS set-up "
                            f"failed: {exc}") from None
    return enrollment


async def enroll_request(url: str, request: wire.EnrollRequest, ctx: ssl.SSLContext,
                         patience: float = BUSY_PATIENCE,
                         source: str | None = None) -> wire.EnrollResponse:
    """Enroll; a busy server (429, 5xx) is retried with backoff for a while, anything
    else is final. (`source`: bench/burst.py enrolls from many source addresses.)"""
    backoff = Backoff(base=0.5, cap=10.0)
    deadline = time.monotonic() + patience
    conn = Connection(url, ctx, source)
    try:
        while True:
            try:
                return await call(conn, wire.ENROLL_PATH, wire.to_json(request), wire.EnrollResponse)
            except ServerError as exc:
                busy = exc.status is not None and exc.retryable
                if busy and time.monotonic() < deadline:
                    log.info("server busy (%s); retrying", exc)
                    await backoff.wait(exc.retry_after)
                    continue
                if exc.status is not None and 400 <= exc.status < 500:
                    raise JoinError(f"the server refused to enroll this host: {exc}") from None
                raise JoinError(str(exc)) from None
    finally:
        conn.close()


def install_libvirt_tls(config: AgentConfig, state: State, key: object,
                        identity: wire.Identity, renewal: bool = False) -> None:
    """Install libvirtd's TLS files and make libvirtd use them: at enrollment by turning the
    listener on, at renewal by reloading the files in place (open connections stay)."""
    if not (identity.libvirt_certificate and identity.libvirt_ca_certificate
            and identity.libvirt_client_dn):
        log.warning("the server sent no libvirt certificate: libvirtd TLS not set up")
        return
    tls = LibvirtTLS(config.libvirt, state.dir)
    changed = tls.install(pki.key_pem(key), identity.libvirt_certificate,  # type: ignore[arg-type]
                          identity.libvirt_ca_certificate, identity.libvirt_client_dn)
    if changed:
        done = tls.reload() if renewal else tls.apply()
        log.info("libvirtd TLS set up on port %d: %s", config.libvirt.tls_port, done)

