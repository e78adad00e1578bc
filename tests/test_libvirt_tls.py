"""libvirtd's TLS set-up against a hostile server (issue 16, item 4): what the server sends
is checked before anything is written, the managed block is found by a marker no value
can forge, and purge (the postrm, as a shell script) removes exactly that block.

Everything here works on a temp libvirtd.conf: the machine's own is never touched.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import LibvirtConfig
from agent.libvirt_tls import LEGACY_BEGIN, LEGACY_END, Ledger, LibvirtTLS, TLSSetupError
from common import pki
from tests.harness import ROOT

DN = "CN=virtfleet-server-libvirt-client"
# What the attack sent as `libvirt_client_dn`: it closed the string and the list, opened
# a TCP listener without auth, ended the block with a fake END marker and after it
# turned certificate checks off, where neither the agent nor purge removed it.
INJECTION = ('CN=x"]\nlisten_tcp = 1\nauth_tcp = "none"\n' + LEGACY_END
             + '\ntls_no_verify_certificate = 1\n#')
ADMIN_CONF = "# the admin's own settings\nmax_clients = 20\n"


def certificate(cn: str = "virtfleet libvirt CA") -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return pki.cert_pem(cert)


def setup(root: Path, conf_text: str = ADMIN_CONF) -> tuple[LibvirtTLS, LibvirtConfig, Path]:
    """A LibvirtTLS whose libvirtd.conf, TLS files and state dir are under `root`."""
    config = LibvirtConfig(conf=root / "etc/libvirt/libvirtd.conf",
                           ca_file=root / "etc/pki/CA/cacert.pem",
                           cert_file=root / "etc/pki/libvirt/servercert.pem",
                           key_file=root / "etc/pki/libvirt/private/serverkey.pem")
    config.conf.parent.mkdir(parents=True)
    config.conf.write_text(conf_text)
    state = root / "var/lib/virtfleet-agent"
    state.mkdir(parents=True, mode=0o700)
    return LibvirtTLS(config, state), config, state


def install(tls: LibvirtTLS, dn: str = DN, cert: str | None = None, ca: str | None = None) -> bool:
    key = pki.key_pem(pki.new_key())
    return tls.install(key, cert or certificate("host"), ca or certificate(), dn)


def ledger(state: Path) -> Ledger:
    return Ledger.parse((state / "libvirt-tls.ledger").read_text())


def test_injected_client_dn_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    tls, config, state = setup(tmp_path)
    with pytest.raises(TLSSetupError, match="not a plain DN"):
        install(tls, dn=INJECTION)
    assert config.conf.read_text() == ADMIN_CONF
    assert not config.key_file.exists() and not config.cert_file.exists()
    assert not (state / "libvirt-tls.ledger").exists()


@pytest.mark.parametrize("dn", ['CN=a"b', "CN=a\\b", "CN=a\rb", "CN=" + "a" * 300, "", "CN=é"])
def test_client_dn_outside_the_grammar_is_refused(tmp_path: Path, dn: str) -> None:
    tls, config, _state = setup(tmp_path)
    with pytest.raises(TLSSetupError, match="client DN"):
        install(tls, dn=dn)
    assert config.conf.read_text() == ADMIN_CONF


@pytest.mark.parametrize("bad", [
    "not a certificate\n",
    "{cert}listen_tcp = 1\n",
    "{cert}{cert}",
    "# hello\n{cert}",
    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",  # PEM, but no X.509
])
def test_certificates_must_be_one_pem_certificate_and_nothing_else(tmp_path: Path,
                                                                    bad: str) -> None:
    tls, config, _state = setup(tmp_path)
    pem = bad.format(cert=certificate())
    with pytest.raises(TLSSetupError, match="certificate"):
        install(tls, cert=pem)
    with pytest.raises(TLSSetupError, match="certificate"):
        install(tls, ca=pem)
    assert not config.cert_file.exists() and not config.ca_file.exists()
    assert config.conf.read_text() == ADMIN_CONF


def test_a_legit_dn_is_written_in_a_block_with_the_ledger_nonce(tmp_path: Path) -> None:
    tls, config, state = setup(tmp_path)
    assert install(tls)
    text = config.conf.read_text()
    nonce = ledger(state).marker
    assert nonce and len(nonce) == 32
    assert text.startswith(ADMIN_CONF)
    lines = text.splitlines()
    assert f"# BEGIN virtfleet {nonce} (managed by virtfleet-agent: do not edit this block)" in lines
    assert f"# END virtfleet {nonce}" in lines
    assert f'tls_allowed_dn_list = ["{DN}"]' in lines
    assert tls.configured()
    # A renewal with the same DN keeps the same block (and nonce), in one place.
    install(tls)
    assert ledger(state).marker == nonce
    assert config.conf.read_text().count("# BEGIN virtfleet") == 1


def test_forged_markers_in_the_admins_conf_do_not_confuse_the_block(tmp_path: Path) -> None:
    """Lines that look like (old or guessed) markers, outside our block, are the admin's:
    replacing our block keeps them, and they never delimit what is removed."""
    forged = (ADMIN_CONF + LEGACY_BEGIN + "\nmax_workers = 30\n" + LEGACY_END + "\n"
              + "# END virtfleet 00000000000000000000000000000000\n")
    tls, config, state = setup(tmp_path, forged)
    install(tls)
    with config.conf.open("a") as f:  # the admin adds lines after our block
        f.write(LEGACY_END + "\nmax_queued_clients = 5\n")
    install(tls, dn="CN=another-client")
    text = config.conf.read_text()
    assert text.startswith(forged)
    assert LEGACY_END + "\nmax_queued_clients = 5\n" in text
    assert '"CN=another-client"' in text and DN not in text
    assert text.count(f"# BEGIN virtfleet {ledger(state).marker}") == 1


def test_an_old_block_with_injected_lines_is_refused_not_kept(tmp_path: Path) -> None:
    """A block of the un-nonced kind (older versions) is replaced when it is ours line by
    line; one holding lines we never write (the old injection) is refused."""
    old = "\n".join([LEGACY_BEGIN, "listen_tls = 1", 'tls_allowed_dn_list = ["CN=x"]',
                     "listen_tcp = 1", LEGACY_END, ""])
    tls, config, state = setup(tmp_path, ADMIN_CONF + "\n" + old)
    (state / "libvirt-tls.ledger").write_text(f"conf {config.conf}\n")
    with pytest.raises(TLSSetupError, match="listen_tcp"):
        install(tls)
    config.conf.write_text(ADMIN_CONF + "\n" + old.replace("listen_tcp = 1\n", ""))
    install(tls)
    text = config.conf.read_text()
    assert LEGACY_BEGIN not in text and text.startswith(ADMIN_CONF)
    assert f"# BEGIN virtfleet {ledger(state).marker}" in text


def run_postrm(root: Path) -> subprocess.CompletedProcess[str]:
    """The package's postrm, `purge`, acting on `root` as dpkg --root would (DPKG_ROOT)."""
    return subprocess.run(["sh", str(ROOT / "debian" / "virtfleet-agent.postrm"), "purge"],
                          capture_output=True, text=True, timeout=30,
                          env=os.environ | {"DPKG_ROOT": str(root)})


def as_seen_inside(root: Path, state: Path) -> None:
    """The ledger as an agent running inside `root` would have written it."""
    path = state / "libvirt-tls.ledger"
    path.write_text(path.read_text().replace(str(root), ""))


def test_purge_removes_exactly_our_block_and_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    before = (ADMIN_CONF + LEGACY_BEGIN + "\nmax_workers = 30\n" + LEGACY_END + "\n"
              + "# END virtfleet 00000000000000000000000000000000\n")
    tls, config, state = setup(root, before)
    (root / "etc/pki/libvirt").mkdir(parents=True)  # there before: purge must keep it
    install(tls)
    with config.conf.open("a") as f:
        f.write("\n" + LEGACY_END + "\ntls_no_verify_certificate = 0\n")
    as_seen_inside(root, state)
    result = run_postrm(root)
    assert result.returncode == 0, result.stderr
    assert config.conf.read_text() == before + "\n" + LEGACY_END + "\ntls_no_verify_certificate = 0\n"
    for path in (config.key_file, config.cert_file, config.ca_file, config.key_file.parent,
                 root / "etc/pki/CA", state):
        assert not path.exists(), f"purge left {path}"
    assert (root / "etc/pki/libvirt").is_dir()
    # No systemd here to restart libvirtd: purge says that its listener is still open.
    assert "still listens for TLS on port 16514" in result.stderr
    assert "without --listen" in result.stderr


def test_purge_keeps_a_file_changed_since_and_a_block_without_its_end(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tls, config, state = setup(root)
    install(tls)
    config.cert_file.write_text("the admin's own\n")
    nonce = ledger(state).marker
    damaged = config.conf.read_text().replace(f"# END virtfleet {nonce}\n", "")
    config.conf.write_text(damaged)
    as_seen_inside(root, state)
    assert run_postrm(root).returncode == 0
    assert config.cert_file.read_text() == "the admin's own\n"
    assert config.conf.read_text() == damaged
