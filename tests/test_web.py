"""The operators' web page: the real server and agents; headless Chromium for what a person
does on the page, plain HTTP (http.client) for what a browser would never show."""

from __future__ import annotations

import datetime as dt
import html
import http.client
import http.cookies
import http.server
import ipaddress
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.audit import Audit
from server.fleet import Refused
from server.store.sqlite import SqliteStore
from server.websessions import LOGIN_TTL, LoginRefused, WebSessions
from tests.conftest import FAST
from tests.harness import ROOT, Agent, Libvirtd, Server, free_port, wait_for
from tests.test_admin_cli import checkin_as

MakeAgent = Callable[..., Agent]
ROOT_ACTOR = "root (uid 0)"
# Times an element is found again when the live page replaced it mid-use.
STALE_RETRIES = 5
PAGES = ("/", "/hosts", "/hosts/{id}", "/hosts/{id}/forget", "/tokens", "/audit", "/sessions",
         "/events?since=0", "/static/web.js", "/static/web.css", "/no-such-page")
POSTS = ("/hosts/{id}/disable", "/hosts/{id}/forget", "/tokens", "/tokens/x/revoke",
         "/sessions/x/revoke", "/logout")


# -- without a browser -----------------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    text: str


@dataclass
class Client:
    """What a browser sends, and nothing it would add by itself: cookies by hand."""

    base: str  # http://127.0.0.1:PORT
    context: ssl.SSLContext | None = None
    cookie: str = ""  # "name=value"
    csrf: str = ""

    def call(self, method: str, path: str, form: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> Answer:
        parts = urllib.parse.urlsplit(self.base)
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(parts.hostname or "", parts.port, context=self.context,
                                        timeout=10) if parts.scheme == "https" else
            http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10))
        sent = {"Cookie": self.cookie} if self.cookie else {}
        if form is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=urllib.parse.urlencode(form) if form is not None else None,
                         headers=sent | (headers or {}))
            resp = conn.getresponse()
            return Answer(resp.status, resp.headers, resp.read().decode(errors="replace"))
        finally:
            conn.close()

    def get(self, path: str) -> Answer:
        return self.call("GET", path)

    def post(self, path: str, form: dict[str, str], origin: str | None = "",
             csrf: str | None = "") -> Answer:
        """A form post; by default with this page's Origin and this session's CSRF token."""
        headers = {"Origin": self.base if origin == "" else origin} if origin is not None else {}
        fields = form | ({"csrf": self.csrf if csrf == "" else csrf} if csrf is not None else {})
        return self.call("POST", path, fields, headers)

    def login(self, url: str) -> Answer:
        answer = self.get(url.removeprefix(self.base))
        assert answer.status == 303, answer.text
        morsel = next(iter(http.cookies.SimpleCookie(answer.headers["Set-Cookie"]).values()))
        self.cookie = f"{morsel.key}={morsel.value}"
        page = self.get("/hosts")
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert page.status == 200 and match, page.text
        self.csrf = match[1]
        return answer


def web_server(start_server: Callable[..., Server], *extra: str) -> tuple[Server, str]:
    """A server with its web page on a port of its own; its base URL."""
    port = free_port()
    server = start_server(*FAST, "--web-listen", f"127.0.0.1:{port}", *extra)
    scheme = "https" if "--web-cert" in extra else "http"
    return server, f"{scheme}://127.0.0.1:{port}"


def web_login(server: Server) -> str:
    return str(server.admin("web-login").stdout.strip())


def joined(server: Server, make_agent: MakeAgent, name: str) -> Agent:
    agent = make_agent(name, None)
    result = agent.join(server.token())
    assert result.returncode == 0, result.stderr
    return agent


@pytest.fixture
def page(start_server: Callable[..., Server]) -> tuple[Server, Client]:
    server, base = web_server(start_server)
    return server, Client(base)


def test_a_login_url_works_once_for_60_s_and_a_session_ends_idle_or_revoked(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    clock = [1000.0]
    sessions = WebSessions(store, Audit(store, clock=lambda: clock[0]), "http://127.0.0.1:8444",
                           idle=3600.0, clock=lambda: clock[0])
    url, expires = sessions.create_login(ROOT_ACTOR)
    assert expires == 1000.0 + LOGIN_TTL
    with pytest.raises(Refused, match="web page is off"):
        WebSessions(store, Audit(store), "").create_login(ROOT_ACTOR)
    secret = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]
    clock[0] += LOGIN_TTL + 1
    with pytest.raises(LoginRefused, match="expired"):
        sessions.login(secret, "127.0.0.1", "test")
    url, _ = sessions.create_login(ROOT_ACTOR)
    secret = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"][0]
    clock[0] += LOGIN_TTL - 1
    started = sessions.login(secret, "127.0.0.1", "test")
    with pytest.raises(LoginRefused, match="used already"):
        sessions.login(secret, "127.0.0.1", "test")
    with pytest.raises(LoginRefused, match="not one this server made"):
        sessions.login("guess", "127.0.0.1", "test")
    assert sessions.session(started.secret) == started.session
    clock[0] += 3000.0
    assert sessions.session(started.secret) is not None  # used: 3000 s is its idle time now
    clock[0] += 3601.0
    assert sessions.session(started.secret) is None
    assert sessions.view(started.session)["state"] == "expired (idle)"
    # The database holds digests only: neither the login secret nor the cookie.
    store.close()
    raw = (tmp_path / "state.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("state.db-*"))
    assert secret.encode() not in raw and started.secret.encode() not in raw
    actions = [(e.action, e.outcome) for e in SqliteStore(tmp_path / "state.db").audit()]
    assert actions == [("web_login_url", "ok"), ("web_login", "refused"), ("web_login_url", "ok"),
                       ("web_login", "ok"), ("web_login", "refused")]  # no entry for a guess


@pytest.mark.slow
def test_nothing_is_reachable_without_a_session_and_the_agent_port_serves_no_page(
        page: tuple[Server, Client], make_agent: MakeAgent) -> None:
    server, client = page
    host_id = joined(server, make_agent, "hv-nosession").host_id()
    for cookie in ("", "virtfleet-session=forged"):
        client.cookie = cookie
        for path in PAGES:
            answer = client.get(path.format(id=host_id))
            assert answer.status == 401 and "web-login" in answer.text, (path, answer.status)
        for path in POSTS:
            answer = client.post(path.format(id=host_id), {})
            assert answer.status == 401, (path, answer.status)
    assert server.host(host_id)["admin_state"] == "enabled"
    agent_port = Client(server.url, ssl.create_default_context(
        cafile=str(server.state / "identity" / "ca.crt")))
    for path in ("/", "/hosts", "/login?token=x", "/static/web.js"):
        assert agent_port.get(path).status == 404, path


@pytest.mark.slow
def test_the_login_url_sets_a_strict_http_only_cookie_once_and_is_audited(
        page: tuple[Server, Client]) -> None:
    server, client = page
    url = web_login(server)
    assert url.startswith(f"{client.base}/login?token=")
    answer = client.login(url)
    assert answer.headers["Location"] == "/hosts"  # the secret leaves the address bar
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    cookie = answer.headers["Set-Cookie"]
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert cookie.startswith("virtfleet-session=") and attributes == {"httponly", "path", "samesite"}
    assert "SameSite=Strict" in cookie and "Path=/" in cookie
    hosts = client.get("/hosts")
    assert "default-src 'none'" in hosts.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in hosts.headers["Content-Security-Policy"]
    assert hosts.headers["X-Frame-Options"] == "DENY" and hosts.headers["Cache-Control"] == "no-store"
    # No inline script, no event attributes: all of it is /static/web.js.
    assert not re.search(r"<script(?![^>]*\ssrc=)", hosts.text) and not re.search(r"\son\w+=", hosts.text)

    again = Client(client.base).get(url.removeprefix(client.base))
    assert again.status == 403 and "used already" in again.text and "Set-Cookie" not in again.headers
    [session] = server.admin_json("web-sessions", "list")
    actor = f"web session {session['id']} of {ROOT_ACTOR}"
    entries = [(e["actor"], e["action"], e["outcome"]) for e in server.admin_json("audit")]
    assert entries == [(ROOT_ACTOR, "web_login_url", "ok"), (actor, "web_login", "ok"),
                       ("browser at 127.0.0.1", "web_login", "refused")]


@pytest.mark.slow
def test_a_post_needs_the_csrf_token_and_this_pages_origin(
        page: tuple[Server, Client], make_agent: MakeAgent) -> None:
    server, client = page
    host_id = joined(server, make_agent, "hv-csrf").host_id()
    client.login(web_login(server))
    path = f"/hosts/{host_id}/disable"
    for origin, csrf in [(None, ""), ("http://127.0.0.1:1", ""), ("null", ""),
                         ("", None), ("", "0" * 64), ("", "")]:
        answer = client.post(path, {}, origin=origin, csrf=csrf)
        if (origin, csrf) == ("", ""):
            assert answer.status == 303 and answer.headers["Location"] == f"/hosts/{host_id}"
        else:
            assert answer.status == 403 and "Refused" in answer.text, (origin, csrf, answer.status)
            assert server.host(host_id)["admin_state"] == "enabled"
    assert server.host(host_id)["admin_state"] == "disabled"
    [session] = server.admin_json("web-sessions", "list")
    [entry] = [e for e in server.admin_json("audit") if e["action"] == "host_disable"]
    assert entry["actor"] == f"web session {session['id']} of {ROOT_ACTOR}" and entry["outcome"] == "ok"


@pytest.mark.slow
def test_bad_form_values_are_refused_in_words(page: tuple[Server, Client],
                                              make_agent: MakeAgent) -> None:
    server, client = page
    host_id = joined(server, make_agent, "hv-forms").host_id()
    client.login(web_login(server))
    for path, form, words in [
            ("/tokens", {"uses": "many"}, "uses: 'many' is not a whole number"),
            ("/tokens", {"ttl": "forever"}, "is not a duration like 30s"),
            ("/tokens", {"ttl": "30d"}, "ttl must be between 1 s and 604800 s"),
            ("/tokens", {"role": "admin"}, "role 'admin' is not one of"),
            (f"/hosts/{host_id}/set-role", {"role": "admin"}, "role 'admin' is not one of"),
            (f"/hosts/{host_id}/forget", {}, "needs its confirmation"),
            ("/hosts/nosuchhost/disable", {}, "no host 'nosuchhost'")]:
        answer = client.post(path, form)
        assert 400 <= answer.status < 500 and words in html.unescape(answer.text), (path, answer.text)
        assert "Traceback" not in answer.text
    assert server.host(host_id)["role"] == "mixed"


@pytest.mark.slow
def test_a_revoked_session_ends_access(page: tuple[Server, Client]) -> None:
    server, client = page
    client.login(web_login(server))
    [session] = server.admin_json("web-sessions", "list")
    assert session["state"] == "active" and session["address"] == "127.0.0.1"
    listed = server.admin("web-sessions", "list").stdout
    assert listed.split()[:7] == ["ID", "MADE", "BY", "STARTED", "LAST", "USED", "FROM"]
    assert server.admin("web-sessions", "revoke", session["id"][:4]).stdout.strip() == \
        f"web session {session['id']} revoked"
    assert client.get("/hosts").status == 401
    assert server.admin_json("web-sessions", "list")[0]["state"] == "revoked"
    [entry] = [e for e in server.admin_json("audit") if e["action"] == "web_session_revoke"]
    assert entry["actor"] == ROOT_ACTOR and entry["target"] == f"web session {session['id']} of {ROOT_ACTOR}"
    # Logging out is revoking one's own session, with the session as the actor.
    client.login(web_login(server))
    assert client.post("/logout", {}).status == 200 and client.get("/hosts").status == 401
    last = server.admin_json("audit")[-1]
    assert last["action"] == "web_session_revoke" and last["actor"].startswith("web session ")


@pytest.mark.slow
def test_a_hostile_hostname_and_error_are_shown_escaped(page: tuple[Server, Client],
                                                       make_agent: MakeAgent) -> None:
    server, client = page
    agent = joined(server, make_agent, "plain")
    hostile = '<img src=x onerror="alert(1)">'
    checkin_as(server, agent, hostile, error="</td><script>alert(2)</script>")
    client.login(web_login(server))
    for path in ("/hosts", f"/hosts/{agent.host_id()}", "/audit", "/tokens"):
        text = client.get(path).text
        assert "<img" not in text and "<script>" not in text, path
    shown = client.get(f"/hosts/{agent.host_id()}").text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in shown
    assert "&lt;/td&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in shown


def self_signed(base: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = base / "web.crt", base / "web.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.slow
def test_under_https_the_cookie_is_secure_and_plain_http_is_loopback_only(
        start_server: Callable[..., Server], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server, base = web_server(start_server, "--web-cert", str(cert), "--web-key", str(key))
    client = Client(base, ssl.create_default_context(cafile=str(cert)))
    answer = client.login(web_login(server))
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("__Host-virtfleet-session=") and "; Secure" in cookie, cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.post("/logout", {}).status == 200

    serve = [str(ROOT / ".venv/bin/virtfleet-server"), "--state-dir", str(tmp_path / "other"), "serve"]
    for extra, words in [(["--web-listen", "0.0.0.0:8444"], "not a loopback address"),
                         (["--web-cert", str(cert)], "--web-cert and --web-key go together")]:
        refused = subprocess.run(serve + extra, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and words in refused.stderr, refused.stderr
    assert not (tmp_path / "other").exists()  # refused before it made anything


# -- in a browser ------------------------------------------------------------------------

@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium driven through chromedriver; it and every process it started are
    gone after the test, whatever happened."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="virtfleet-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # As root Chromium refuses to start with its sandbox (it needs an unprivileged user's
    # namespaces); the page it loads is this test's own.
    options.add_argument("--no-sandbox")
    options.add_argument("--headless=new")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1400,900")
    service = Service("/usr/bin/chromedriver")
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        yield driver
    finally:
        family = _family(service)
        if driver is not None:
            driver.quit()
        service.stop()
        for proc in family:
            if proc.is_running():
                proc.kill()
        psutil.wait_procs(family, timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _family(service: object) -> list[psutil.Process]:
    process = getattr(service, "process", None)
    if process is None:
        return []
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def until(driver: object, what: str, condition: Callable[[object], object], timeout: float = 20) -> object:
    """`condition(driver)` once it is truthy; at the deadline, fail with what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(condition)
    except TimeoutException:
        shown = driver.find_element(By.TAG_NAME, "body").text[:1000]  # type: ignore[attr-defined]
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; at "
                             f"{driver.current_url}:\n{shown}") from None  # type: ignore[attr-defined]


def text_of(driver: object, selector: str) -> str:
    return str(on_element(driver, selector, lambda element: element.text))


def click(driver: object, selector: str) -> None:
    on_element(driver, selector, lambda element: element.click())


def on_element(driver: object, selector: str, use: Callable[[Any], object]) -> object:
    """`use` on the element `selector` finds, found again if the live page replaced it
    between the find and the use (the page re-renders a host's rows and fields as its
    events arrive)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(STALE_RETRIES):
        try:
            return use(driver.find_element(By.CSS_SELECTOR, selector))  # type: ignore[attr-defined]
        except StaleElementReferenceException as error:
            stale = error
    raise stale


def screenshots(tmp_path: Path) -> Path:
    """docs/ when asked for (VIRTFLEET_SCREENSHOTS=1: the README's pictures), else the
    test's own dir: a test run changes no tracked file."""
    return ROOT / "docs" if os.environ.get("VIRTFLEET_SCREENSHOTS") == "1" else tmp_path


def logged_in(driver: object, server: Server, base: str) -> str:
    url = web_login(server)
    driver.get(url)  # type: ignore[attr-defined]
    until(driver, "the hosts page, live", lambda d: d.current_url == f"{base}/hosts"
          and text_of(d, "#live") == "live")
    return url


@pytest.mark.slow
def test_in_a_browser_a_host_appears_live_and_disabling_it_closes_its_connection(
        start_server: Callable[..., Server], libvirtd: Libvirtd, make_agent: MakeAgent,
        browser: object, tmp_path: Path) -> None:
    server, base = web_server(start_server)
    logged_in(browser, server, base)
    browser.execute_script("window.neverReloaded = true")  # type: ignore[attr-defined]

    agent = make_agent("hv-web-01", libvirtd)
    assert agent.join(server.token("--role", "hypervisor")).returncode == 0
    agent.start()
    host_id = agent.host_id()
    waiting = make_agent("hv-web-02", None)
    assert waiting.join(server.token("--no-auto-enable")).returncode == 0
    row = f'#hosts tr[data-id="{host_id}"]'
    until(browser, "the joined host's row, online", lambda d: text_of(d, f"{row} .status") == "online")
    until(browser, "the pending host's row", lambda d: text_of(
        d, f'#hosts tr[data-id="{waiting.host_id()}"] .status') == "pending")
    assert browser.execute_script("return window.neverReloaded") is True  # type: ignore[attr-defined]
    assert "libvirt connection open" in text_of(browser, f"{row} .detail")
    browser.save_screenshot(str(screenshots(tmp_path) / "web-hosts.png"))  # type: ignore[attr-defined]

    click(browser, f"{row} a")
    until(browser, "the host's page", lambda d: d.current_url == f"{base}/hosts/{host_id}")
    assert text_of(browser, "#connection-state") == "online"
    assert text_of(browser, "#gateway-uri") == server.gateway_uri(host_id)
    assert "qemu+tls://" in text_of(browser, "#connection")
    browser.save_screenshot(str(screenshots(tmp_path) / "web-host.png"))  # type: ignore[attr-defined]

    click(browser, "#disable")
    until(browser, "the page to say disabled", lambda d: text_of(d, "#admin-state") == "disabled")
    wait_for(lambda: server.host(host_id)["connection"]["state"] == "closed", 15,
             "the disabled host's connection to close")
    assert server.status_of(host_id) == "disabled"
    browser.refresh()  # type: ignore[attr-defined]
    assert text_of(browser, "#connection-state") == "closed"
    [entry] = [e for e in server.admin_json("audit") if e["action"] == "host_disable"]
    assert entry["actor"].startswith("web session ") and entry["actor"].endswith(f"of {ROOT_ACTOR}")


@pytest.mark.slow
def test_in_a_browser_a_token_made_on_the_page_joins_a_host_and_forget_asks_first(
        start_server: Callable[..., Server], make_agent: MakeAgent, browser: object) -> None:
    server, base = web_server(start_server)
    url = logged_in(browser, server, base)
    browser.get(f"{base}/tokens")  # type: ignore[attr-defined]
    click(browser, "#token-auto-enable")  # hosts wait for Enable
    click(browser, "#create-token")
    command = str(until(browser, "the join command", lambda d: text_of(d, "#join-command")))
    match = re.fullmatch(r"virtfleet-agent join '(vfjoin1\.[\w.-]+)'", command)
    assert match, command
    agent = make_agent("hv-from-page", None)
    result = agent.join(match[1])
    assert result.returncode == 0, result.stderr
    host_id = agent.host_id()
    browser.get(f"{base}/tokens")  # type: ignore[attr-defined]
    assert host_id in text_of(browser, "#tokens tbody tr:first-child")
    assert "1/1" in text_of(browser, "#tokens tbody tr:first-child")

    browser.get(f"{base}/hosts/{host_id}")  # type: ignore[attr-defined]
    assert text_of(browser, "#status") == "pending"
    click(browser, "#enable")
    until(browser, "the page to say enabled", lambda d: text_of(d, "#admin-state") == "enabled")
    click(browser, "#forget")
    until(browser, "the confirmation", lambda d: d.current_url == f"{base}/hosts/{host_id}/forget")
    assert server.host(host_id)["id"] == host_id  # asking forgot nothing
    click(browser, "#confirm-forget")
    until(browser, "the hosts page", lambda d: d.current_url == f"{base}/hosts")
    assert all(h["id"] != host_id for h in server.hosts())

    browser.get(url)  # type: ignore[attr-defined]
    assert "used already" in text_of(browser, "#message")


class Attacker(http.server.BaseHTTPRequestHandler):
    """Another site's page (another port of this machine: the same site, as far as the
    SameSite cookie is concerned) that posts a form to the web page as soon as it loads."""

    page = b""

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_in_a_browser_a_forged_cross_site_post_is_refused(
        start_server: Callable[..., Server], make_agent: MakeAgent, browser: object) -> None:
    server, base = web_server(start_server)
    host_id = joined(server, make_agent, "hv-target").host_id()
    logged_in(browser, server, base)
    Attacker.page = (f'<form method="post" action="{base}/hosts/{host_id}/disable">'
                     '<input name="csrf" value="guessed"></form>'
                     "<script>document.forms[0].submit()</script>").encode()
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Attacker)
    serving = threading.Thread(target=evil.serve_forever, daemon=True)
    serving.start()
    try:
        browser.get(f"http://127.0.0.1:{evil.server_address[1]}/")  # type: ignore[attr-defined]
        until(browser, "the forged post's answer", lambda d: d.current_url.startswith(base))
        assert "did not come from this page" in text_of(browser, "#message")
    finally:
        evil.shutdown()
        evil.server_close()
        serving.join(10)
    assert server.host(host_id)["admin_state"] == "enabled"
    assert not [e for e in server.admin_json("audit") if e["action"] == "host_disable"]
