"""The audit log: the real server and agent, the real admin command line."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from server.audit import Audit, peer_actor
from server.model import AuditEntry
from server.store.sqlite import SqliteStore
from tests.harness import Agent, Server

ROOT_ACTOR = "root (uid 0)"


@pytest.mark.slow
def test_every_enrollment_and_admin_action_is_audited_with_its_actor_and_no_secret(
        server: Server, make_agent: Callable[..., Agent]) -> None:
    created = server.admin_json("token", "create", "--uses", "2")
    agent = make_agent("hv-audit", None)
    assert agent.join(created["join"]).returncode == 0
    host_id = agent.host_id()
    revoked = server.admin_json("token", "create")
    server.admin("token", "revoke", revoked["token"]["id"])
    assert make_agent("hv-late", None).join(revoked["join"]).returncode != 0
    server.admin("hosts", "disable", host_id)
    server.admin("hosts", "enable", host_id)
    server.admin("hosts", "set-role", host_id, "disk_operations")
    assert server.admin("hosts", "set-role", host_id, "bogus", check=False).returncode != 0
    server.admin("hosts", "forget", host_id)

    entries = server.admin_json("audit")
    got = [(e["actor"], e["action"], e["outcome"]) for e in entries]
    assert got == [
        (ROOT_ACTOR, "token_create", "ok"),
        ("agent at 127.0.0.1", "enroll", "ok"),
        (ROOT_ACTOR, "token_create", "ok"),
        (ROOT_ACTOR, "token_revoke", "ok"),
        ("agent at 127.0.0.1", "enroll", "refused"),
        (ROOT_ACTOR, "host_disable", "ok"),
        (ROOT_ACTOR, "host_enable", "ok"),
        (ROOT_ACTOR, "host_set_role", "ok"),
        (ROOT_ACTOR, "host_forget", "ok"),
    ]  # argparse refuses the bogus role before the server hears of it
    enrolled, refused = entries[1], entries[4]
    assert enrolled["target"] == f"host {host_id} (hv-audit)" and enrolled["host_id"] == host_id
    assert f"token {created['token']['id']}" in enrolled["detail"]
    assert enrolled["address"] == "127.0.0.1"
    assert refused["target"] == f"token {revoked['token']['id']}" and "revoked" in refused["detail"]
    assert entries[7]["detail"] == "role mixed -> disk_operations"
    # The signed tokens themselves appear nowhere: not in the audit, not in the log.
    log = server.proc.log_path.read_text()
    for token in (created["join"], revoked["join"]):
        secret = token.rsplit(".", 1)[-1]  # the signature, at least, is in every form
        assert secret not in str(entries) and secret not in log
    assert "event=audit_host_forget" in log and f"host_id={host_id}" in log

    # A forgotten host's entries are still found by its id; the table is for people.
    about = server.admin_json("audit", "--host", host_id)
    assert [e["action"] for e in about] == ["enroll", "host_disable", "host_enable",
                                            "host_set_role", "host_forget"]
    text = server.admin("audit", "--since", "1h").stdout
    assert text.splitlines()[0].split() == ["TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL"]
    assert len(text.splitlines()) == 1 + len(entries)
    assert server.admin("audit", "--since", "2001-01-01").stdout.count("\n") == len(entries) + 1
    bad = server.admin("audit", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "neither a duration" in bad.stderr


def test_the_admin_peer_is_named_by_the_kernels_word() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        assert peer_actor(ours) == f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    assert peer_actor(None) == "unknown"


def test_audit_entries_are_kept_for_the_retention_and_filtered_by_host(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    clock = [1000.0]
    audit = Audit(store, clock=lambda: clock[0])
    audit.record("root (uid 0)", "host_disable", "host a (one)", "ok", host_id="a")
    clock[0] = 5000.0
    audit.record("root (uid 0)", "host_enable", "host b (two)", "ok", host_id="b")
    audit.record("agent at 10.0.0.9", "enroll", "token t1", "refused", "token expired",
                 address="10.0.0.9")
    assert [e.action for e in store.audit()] == ["host_disable", "host_enable", "enroll"]
    assert store.audit(host_id="b") == [AuditEntry(5000.0, "root (uid 0)", "host_enable",
                                                   "host b (two)", "ok", host_id="b")]
    assert [e.action for e in store.audit(since=2000.0)] == ["host_enable", "enroll"]
    assert [e.action for e in store.audit(limit=1)] == ["enroll"]  # the newest
    assert store.prune(now=6000.0, audit_retention=3000.0) == 1
    assert [e.action for e in store.audit()] == ["host_enable", "enroll"]
    store.close()
