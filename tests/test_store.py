"""The state store's promises (server/store/__init__.py), held by SQLite and by
PostgreSQL alike: every test here runs on both (a real PostgreSQL 15, a database of its
own per test), but for the few about one engine's plans and statements."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common import wire
from server.hosts import SWEEP_BATCH, HostStatus
from server.model import Connection, Host, LinkState, Status, Token, WebLogin, WebSession
from server.store import StoreError, StoreUnavailable
from server.store.postgres import PostgresStore
from server.store.sql import COUNTS_SQL, HISTORY_BURST, HISTORY_KEEP, SqlStore, WatchedCache
from server.store.sqlite import SWEEP_SQL, SqliteStore
from tests.harness import Postgres, free_port, until, wait_for
from tests.test_server_units import make_host, report

ONLINE = Connection(LinkState.ONLINE, "open")
Opener = Callable[[], SqlStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the test's store: SQLite in tmp_path, or a new PostgreSQL database. Each call
    is another connection to the same store (another server, for PostgreSQL)."""
    if request.param == "sqlite":
        def opener() -> SqlStore:
            return SqliteStore(tmp_path / "state.db")
    else:
        url = request.getfixturevalue("database")

        def opener() -> SqlStore:
            return PostgresStore(url)
    opened: list[SqlStore] = []

    def open_one() -> SqlStore:
        opened.append(opener())
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def token(uses: int = 5, jti: str = "t1") -> Token:
    return Token(jti=jti, role="mixed", auto_enable=True, max_uses=uses, uses=0, created_at=0,
                 expires_at=1e12, revoked_at=None, description="")


def store_with(open_store: Opener, hosts: list[Host]) -> SqlStore:
    store = open_store()
    store.add_token(token(max(1, len(hosts))))
    for host in hosts:
        store.enroll(host, now=host.enrolled_at)
    return store


def revoked(store: SqlStore) -> list[str]:
    rows = store.db.execute("SELECT serial FROM libvirt_certs WHERE revoked_at IS NOT NULL "
                            "ORDER BY serial").fetchall()
    return [r[0] for r in rows]


def test_forgetting_a_host_revokes_all_its_libvirt_certificates(open_store: Opener) -> None:
    store = store_with(open_store, [
        make_host(id="h1", cert_serial="id-h1", libvirt_cert_serial="a1", libvirt_cert_not_after=1e3),
        make_host(id="h2", cert_serial="id-h2", libvirt_cert_serial="b1", libvirt_cert_not_after=1e3)])
    store.update_host("h1", libvirt_cert_serial="a2", libvirt_cert_not_after=2000.0)  # renewed
    assert revoked(store) == []
    store.forget_host("h1", now=30)
    assert revoked(store) == ["a1", "a2"]
    assert store.get_host("h2") is not None and store.host_by_serial("id-h1") is None


def test_a_renewal_revokes_all_but_the_current_and_previous_libvirt_certificates(
        open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="i", libvirt_cert_serial="a1",
                                            libvirt_cert_not_after=1e3)])
    for serial in ("a2", "a3"):
        store.update_host("h1", libvirt_cert_serial=serial, libvirt_cert_not_after=1e3)
    store.revoke_libvirt_certs("h1", ("a3", "a2"), now=5)
    assert revoked(store) == ["a1"]


def test_a_check_in_finds_its_host_by_index_not_by_scanning_in_sqlite(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    for column in ("cert_serial", "prev_cert_serial"):
        plan = store.db.execute(f"EXPLAIN QUERY PLAN SELECT * FROM hosts WHERE {column}=?",
                                ("ab",)).fetchall()
        assert all("USING INDEX" in row["detail"] for row in plan), [row["detail"] for row in plan]
    store.close()


def test_the_sweep_reads_an_index_not_the_hosts_rows_in_sqlite(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    for query, args in ((COUNTS_SQL, ()), (SWEEP_SQL, (1, 1, 1))):
        plan = [row["detail"] for row in store.db.execute(f"EXPLAIN QUERY PLAN {query}", args)]
        assert any("COVERING INDEX hosts_liveness" in step for step in plan), plan
    store.close()


def test_a_queued_check_in_is_seen_by_the_next_lookup_and_by_every_read(open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="s1", last_checkin=1)])
    host = store.host_by_serial("s1")
    assert host is not None and host.libvirtd_ok
    host.take_report(report(ok=False))
    store.record_checkin(host, "10.0.0.9", now=50)
    store.record_report(host)
    again = store.host_by_serial("s1")  # laid over the row, not flushed
    assert again is not None and not again.libvirtd_ok and again.last_checkin == 50
    assert again.report.libvirtd.error == "socket gone" and again.address == "10.0.0.9"
    assert again.report_digest == wire.report_digest(again.report_text) != ""
    store.record_checkin(again, "10.0.0.9", now=60)  # a heartbeat: liveness alone
    assert store.host_by_serial("s1").report_digest == again.report_digest  # type: ignore[union-attr]
    fresh = open_store()  # another reader sees it once flushed
    store.flush_checkins()
    stored = fresh.get_host("h1")
    assert stored is not None and stored.last_checkin == 60 and not stored.libvirtd_ok
    assert stored.report_digest == again.report_digest
    fresh.close()


def test_a_kept_row_leaves_its_report_in_the_database_until_it_is_read(open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="s1")])
    if isinstance(store._rows, WatchedCache):
        store._rows.live = True  # as while its change watch listens
    first = store.host_by_serial("s1")  # read from the database: the caller gets it all
    assert first is not None and first.report_text is not None
    kept = store._rows.by_id("h1")
    assert kept is not None and kept.report_text is None  # what stays in memory
    cached = store.host_by_serial("s1")
    assert cached is not None and cached.report.libvirtd.ok  # read when asked for
    assert cached.report_text == first.report_text
    cached.take_report(report(ok=False))
    store.record_report(cached)  # queued, not written yet: the queued one is read
    again = store.host_by_serial("s1")
    assert again is not None and again.report.libvirtd.error == "socket gone"
    store.close()


def test_sweep_picks_only_hosts_whose_freshness_disagrees_with_their_status(open_store: Opener) -> None:
    now = time.time()
    store = store_with(open_store, [
        make_host(id="fresh", cert_serial="1", last_checkin=now),
        make_host(id="stale", cert_serial="2", last_checkin=now - 100),
        make_host(id="off-stale", cert_serial="3", status="offline", last_checkin=now - 100),
        make_host(id="off-back", cert_serial="4", status="offline", last_checkin=now),
        make_host(id="disabled", cert_serial="5", admin_state="disabled", last_checkin=now - 100),
    ])
    assert sorted(store.hosts_to_sweep(now - 30, started_at=0)) == ["off-back", "stale"]
    # Within the grace period after a server start nobody is stale; the offline host that
    # checked in is still due.
    assert store.hosts_to_sweep(now - 30, started_at=now - 5) == ["off-back"]


def test_a_sweep_marks_thousands_offline_in_a_few_commits_and_keeps_offline_hosts_offline(
        tmp_path: Path) -> None:
    now = time.time()
    many = [make_host(id=f"h{i}", cert_serial=f"s{i}", last_checkin=now - 100) for i in range(1200)]
    store = store_with(lambda: SqliteStore(tmp_path / "state.db"), many)
    commits: list[str] = []
    store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)  # type: ignore[attr-defined]
    status = HostStatus(store, grace=30, links={})
    status.started_at = now - 60  # a server that has run longer than the grace period
    asyncio.run(status.sweep())
    assert store.status_counts() == {"offline": 1200}
    assert len(commits) == -(-1200 // SWEEP_BATCH)  # one commit per batch, not per host
    assert [e.status for e in store.history("h7")] == ["online", "offline"]
    # After a restart a host already offline stays offline until it checks in.
    restarted = HostStatus(store, grace=30, links={})
    assert store.hosts_to_sweep(now - 30, restarted.started_at) == []
    host = store.get_host("h7")
    assert host is not None and restarted.refresh_host(host).status == Status.OFFLINE
    store.close()


def test_retries_that_fail_the_same_way_count_on_one_history_row(open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="s", status="connecting", detail="x")])
    links: dict[str, Connection] = {}
    status = HostStatus(store, grace=1e9, links=links)
    for _ in range(12):  # connecting -> error -> connecting ... the same reason each time
        links["h1"] = Connection(LinkState.CONNECTING, "opening qemu+tls://10.0.0.1:1/system")
        status.refresh("h1")
        links["h1"] = Connection(LinkState.ERROR, "libvirtd is not listening (connection refused)")
        status.refresh("h1")
    history = store.history("h1")
    assert [e.status for e in history] == ["connecting", "error"]
    assert history[-1].tries == 12 and history[-1].last_at is not None
    links["h1"] = ONLINE
    assert status.refresh("h1") is not None
    assert [e.status for e in store.history("h1")] == ["connecting", "error", "online"]


def test_a_flood_of_new_error_texts_cannot_grow_the_history(open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="s")])
    now = 1000.0
    store.set_statuses([("h1", "error", f"error {i}", now + i / 100, True) for i in range(500)])
    history = store.history("h1", limit=1000)
    assert len(history) == 1 + HISTORY_BURST and history[-1].detail == "error 499"
    assert sum(e.tries for e in history[1:]) == 500  # every one counted, few rows kept
    for i in range(HISTORY_KEEP + 50):  # a status change every minute, for hours
        store.set_statuses([("h1", ("error", "online")[i % 2], "x", now + 60 * (i + 1), True)])
    assert len(store.history("h1", limit=10_000)) == HISTORY_KEEP


def test_a_newer_schema_is_refused_with_words(open_store: Opener) -> None:
    store = open_store()
    store.db.execute("PRAGMA user_version=99" if isinstance(store, SqliteStore)
                     else "UPDATE schema_version SET version=99")
    with pytest.raises(StoreError, match="newer than this server knows"):
        open_store()


def test_expired_certificates_and_unused_old_tokens_are_pruned(open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="i", libvirt_cert_serial="a1",
                                            libvirt_cert_not_after=1000.0)])
    store.update_host("h1", libvirt_cert_serial="a2", libvirt_cert_not_after=1e12)
    store.add_token(Token(jti="old", role="mixed", auto_enable=True, max_uses=1, uses=0,
                          created_at=0, expires_at=10, revoked_at=None, description=""))
    assert store.prune(now=1000.0 + 86400 * 40) == 2  # a1 and the unused expired token
    assert [r[0] for r in store.db.execute("SELECT serial FROM libvirt_certs")] == ["a2"]
    assert {t.jti for t in store.list_tokens()} == {"t1"}  # h1 joined with it: kept


def at_once(*calls: Callable[[], object]) -> list[object]:
    """Each call in its own thread, released together; what each returned or raised."""
    start, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i: int, call: Callable[[], object]) -> None:
        start.wait()
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - what it raised is the result
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_of_two_servers_spending_one_single_use_token_at_once_exactly_one_enrolls(
        open_store: Opener) -> None:
    first, second = open_store(), open_store()
    for round_ in range(5):
        jti = f"once-{round_}"
        first.add_token(token(uses=1, jti=jti))
        one, two = (make_host(id=f"{jti}-{n}", cert_serial=f"{jti}-{n}", token_jti=jti) for n in (1, 2))
        results = at_once(functools.partial(first.enroll, one, now=1),
                          functools.partial(second.enroll, two, now=1))
        refused = [r for r in results if isinstance(r, StoreError)]
        assert len(refused) == 1 and "already used (1 of 1 uses)" in str(refused[0]), results
        assert [t.uses for t in open_store().list_tokens() if t.jti == jti] == [1]
    assert len(open_store().list_hosts()) == 5


def test_a_login_url_opens_one_session_even_at_two_servers_at_once(open_store: Opener) -> None:
    first, second = open_store(), open_store()
    first.add_web_login(WebLogin("d1", "root (uid 0)", 0, 1e12))
    sessions = [WebSession(f"s{n}", f"c{n}", "root (uid 0)", 1, 1, "127.0.0.1", "test") for n in (1, 2)]
    results = at_once(lambda: first.start_web_session("d1", sessions[0], now=1),
                      lambda: second.start_web_session("d1", sessions[1], now=1))
    assert sorted(results) == [False, True]  # type: ignore[type-var]
    assert len(open_store().web_sessions()) == 1


@pytest.mark.parametrize("open_store", ["postgresql"], indirect=True)
def test_what_one_replica_writes_the_next_read_of_another_sees(open_store: Opener) -> None:
    first, second = store_with(open_store, [make_host(cert_serial="s1")]), open_store()
    assert (seen := second.host_by_serial("s1")) is not None and seen.admin_state == "enabled"
    first.update_host("h1", admin_state="disabled")
    assert (seen := second.host_by_serial("s1")) is not None and seen.admin_state == "disabled"
    first.set_statuses([("h1", "error", "libvirtd refused", 5, True)])
    assert (seen := second.get_host("h1")) is not None and seen.detail == "libvirtd refused"
    first.forget_host("h1", now=6)
    assert second.host_by_serial("s1") is None and second.get_host("h1") is None


@pytest.mark.parametrize("open_store", ["postgresql"], indirect=True)
def test_the_fleet_keys_are_kept_once_whichever_replica_comes_first(open_store: Opener) -> None:
    first, second = open_store(), open_store()
    assert isinstance(first, PostgresStore) and isinstance(second, PostgresStore)
    assert first.key_material("k") is None
    results = at_once(lambda: first.add_key_material("k", b"first"),
                      lambda: second.add_key_material("k", b"second"))
    assert results[0] == results[1] and results[0] in (b"first", b"second")
    assert open_store().key_material("k") == results[0]  # type: ignore[attr-defined]


def test_a_database_gone_is_a_store_unavailable_in_words_and_back_loses_nothing() -> None:
    pg = Postgres(free_port()).start()  # its own: this test stops it
    try:
        url = pg.new_database("gone")
        store = PostgresStore(url)
        store.add_token(token())
        store.enroll(make_host(cert_serial="s1", last_checkin=1), now=1)
        pg.stop()
        host = make_host(cert_serial="s1")
        store.record_checkin(host, "10.0.0.7", now=99)
        with pytest.raises(StoreUnavailable, match=f"the database postgresql://postgres@127.0.0.1:"
                                                   f"{pg.port}/gone cannot be used"):
            store.flush_checkins()
        with pytest.raises(StoreUnavailable):
            store.get_token("t1")
        pg.start()
        # The store connects again in the background; the queued check-in, kept while it
        # could not be written, goes in then.
        wait_for(lambda: store.flush_checkins() or True, 10, "the store to write again")
        fresh = PostgresStore(url)
        stored = fresh.get_host("h1")
        assert stored is not None and stored.last_checkin == 99 and stored.address == "10.0.0.7"
        assert [t.uses for t in fresh.list_tokens()] == [1]
        fresh.close()
        store.close()
    finally:
        pg.close()


@pytest.mark.parametrize("open_store", ["postgresql"], indirect=True)
def test_a_deposed_owner_writes_no_status_of_the_host_it_lost(open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="s1", status="online")])
    old, new = open_store(), open_store()
    assert isinstance(old, PostgresStore) and isinstance(new, PostgresStore)
    old.fence, new.fence = (lambda _h: ("a", 1)), (lambda _h: ("b", 2))
    store.db.execute("INSERT INTO leases VALUES ('h1', 'a', 1, 1e12)")
    old.set_statuses([("h1", "error", "seen by a", 10, True)])
    assert (seen := store.get_host("h1")) is not None and seen.detail == "seen by a"
    store.db.execute("UPDATE leases SET owner='b', epoch=2")  # a's lease ran out, b took it
    old.set_statuses([("h1", "offline", "a's late word", 11, True)])
    new.set_statuses([("h1", "online", "seen by b", 12, True)])
    seen = store.get_host("h1")
    assert seen is not None and (seen.status, seen.detail) == ("online", "seen by b")
    assert "a's late word" not in [e.detail for e in store.history("h1")]


@pytest.mark.parametrize("open_store", ["postgresql"], indirect=True)
def test_a_replica_keeps_the_rows_it_read_until_another_changes_them(open_store: Opener) -> None:
    store = store_with(open_store, [make_host(cert_serial="s1"), make_host(id="h2", cert_serial="s2")])
    other = open_store()
    assert isinstance(store, PostgresStore)

    async def run() -> None:
        store.watch_changes(asyncio.get_running_loop())
        rows = store._rows
        await until(lambda: getattr(rows, "live", False), "the watch to listen", timeout=10)
        assert store.host_by_serial("s1") is not None  # read, and kept
        reads = count_reads(store)
        for _ in range(3):
            host = store.host_by_serial("s1")
            assert host is not None and host.admin_state == "enabled"
        assert reads() == 0  # from the kept row
        assert store.get_host("h2") is not None
        store.record_checkin(host, "10.0.0.5", now=77)  # its own writes keep it current
        store.flush_checkins()
        # Announcements come in commit order: once another's later change to h2 is heard,
        # the one of its own change to h1 was too, and ignored.
        other.update_host("h2", role_override="mixed")
        await until(lambda: store._rows.by_id("h2") is None, "the other's change to h2", timeout=10)
        assert (kept := store.host_by_serial("s1")) is not None and kept.last_checkin == 77
        assert reads() == 1  # h2's row, not h1's
        other.update_host("h1", admin_state="disabled")  # another replica's change
        await until(lambda: (h := store.host_by_serial("s1")) is not None
                    and h.admin_state == "disabled", "the other's change to be seen", timeout=10)

    asyncio.run(run())


def count_reads(store: PostgresStore) -> Callable[[], int]:
    """How many statements the store ran from now on (its connection's execute)."""
    calls = [0]
    execute = store.db.execute

    def counted(sql: str, args: object = ()) -> object:
        calls[0] += sql.lstrip().upper().startswith("SELECT")
        return execute(sql, args)  # type: ignore[arg-type]

    store.db.execute = counted  # type: ignore[method-assign]
    return lambda: calls[0]
