"""The fleet's keys, and the store that goes with them.

Two CAs (server/ca.py) and the token-signing key. One server keeps them in files of its
state directory, made at its first start. Replicas keep them in their PostgreSQL
database, so that a new replica needs only the database URL; `virtfleet-server init`
writes them there once, and `serve` refuses a database without them (a mistyped URL
must not start a second fleet with CAs of its own that no host trusts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.ca import CertificateAuthority
from server.store import Store, StoreError, open_store
from server.tokens import TokenSigner, load_or_create_signing_key, load_signing_key, new_signing_key_pem

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from server.store.postgres import PostgresStore  # psycopg: only where a database is used

IDENTITY_CA, LIBVIRT_CA = "virtfleet identity CA", "virtfleet libvirt CA"
# Their names in the database's key_material table.
IDENTITY_NAME, LIBVIRT_NAME, SIGNING_NAME = "identity-ca", "libvirt-ca", "token-signing-key"
NAMES = (IDENTITY_NAME, LIBVIRT_NAME, SIGNING_NAME)


@dataclass(frozen=True)
class FleetKeys:
    identity_ca: CertificateAuthority
    libvirt_ca: CertificateAuthority
    signer: TokenSigner


class NotInitialized(StoreError):
    """The database holds no fleet keys yet."""


def keys_in_files(state: Path) -> FleetKeys:
    return FleetKeys(
        CertificateAuthority.load_or_create(state / "identity", IDENTITY_CA),
        CertificateAuthority.load_or_create(state / "libvirt", LIBVIRT_CA),
        TokenSigner(load_or_create_signing_key(state / "token-signing.key")))


def keys_in_database(store: PostgresStore) -> FleetKeys:
    identity, libvirt, signing = (store.key_material(name) for name in NAMES)
    if identity is None or libvirt is None or signing is None:
        raise NotInitialized(
            f"the database {store.where} holds no virtfleet keys: run `virtfleet-server init "
            "--database URL` once, then start the replicas")
    return _keys(identity, libvirt, signing, store.where)


def initialize_database(store: PostgresStore) -> tuple[FleetKeys, bool]:
    """The fleet's keys in the database, made now where missing (two replicas running
    `init` together keep one set). Returns them and whether any was made."""
    before = {name: store.key_material(name) for name in NAMES}
    identity = before[IDENTITY_NAME] or store.add_key_material(
        IDENTITY_NAME, CertificateAuthority.new(IDENTITY_CA).to_pem())
    libvirt = before[LIBVIRT_NAME] or store.add_key_material(
        LIBVIRT_NAME, CertificateAuthority.new(LIBVIRT_CA).to_pem())
    signing = before[SIGNING_NAME] or store.add_key_material(SIGNING_NAME, new_signing_key_pem())
    return _keys(identity, libvirt, signing, store.where), None in before.values()


def _keys(identity: bytes, libvirt: bytes, signing: bytes, where: str) -> FleetKeys:
    return FleetKeys(CertificateAuthority.from_pem(identity), CertificateAuthority.from_pem(libvirt),
                     TokenSigner(load_signing_key(signing, f"{where}: {SIGNING_NAME}")))


def initialize_state(state: Path, database: str) -> tuple[str, FleetKeys, bool]:
    """`init`: (where the keys are, the keys, whether any was made now)."""
    if not database:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        made = not (state / "identity" / "ca.key").exists()
        store, keys = open_store(state), keys_in_files(state)
        store.close()
        return str(state), keys, made
    from server.store.postgres import PostgresStore

    pg = PostgresStore(database)
    try:
        keys, made = initialize_database(pg)
        return pg.where, keys, made
    finally:
        pg.close()


def open_state(state: Path, database: str) -> tuple[Store, FleetKeys]:
    """The store and the keys: PostgreSQL's when `database` is given, else the state
    directory's (SQLite and files)."""
    if not database:
        return open_store(state), keys_in_files(state)
    from server.store.postgres import PostgresStore

    store = PostgresStore(database)
    log.info("state in the database %s, shared with any other replica", store.where)
    try:
        return store, keys_in_database(store)
    except BaseException:
        store.close()
        raise
