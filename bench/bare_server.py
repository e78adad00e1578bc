"""The ceiling: a trivial aiohttp mTLS JSON handler, served the way virtfleet-server serves.

Same aiohttp, same TLS context (server.tls.server_context: the server's certificate,
client certificates checked against the identity CA), same TLS buffer and garbage
collector settings, same path. The handler only parses the JSON body and answers a
CheckinResponse-sized JSON: whatever the real server is slower by is the application's own
work. Its answer names a report digest, so the load generator sends it heartbeats too,
the same bytes as to the real server.

Usage: bare_server.py STATE_DIR PORT INTERVAL   (STATE_DIR: a seeded server state dir)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from aiohttp import web

from common import wire
from common.tls import limit_tls_buffers
from server.ca import CertificateAuthority
from server.fleet import checkin_delay, serial_of
from server.memory import tune_garbage_collector
from server.tls import TLS_READ_BUFFER, ensure_server_cert, server_context, server_names

ANSWER = {"host_id": "0123456789ab", "status": "connecting", "enabled": True, "role": "mixed",
          "detail": "waiting for the agent to report libvirtd's TLS endpoint", "renew": False,
          "server_urls": ["https://127.0.0.1:8443"], "report_digest": "0" * wire.DIGEST_LENGTH,
          "send_report": False}
INTERVAL = "virtfleet.bench.interval"


async def checkin(request: web.Request) -> web.Response:
    json.loads(await request.read())
    # The hosts are spread over the interval as virtfleet-server spreads them (by the
    # client certificate here: no store to find the host's id in).
    serial = serial_of(request.transport.get_extra_info("peercert") if request.transport else None)
    delay = checkin_delay(serial or "", time.time(), request.app[INTERVAL])
    return web.json_response(ANSWER | {"checkin_interval": delay})


def main() -> int:
    state, port, interval = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    limit_tls_buffers(TLS_READ_BUFFER)
    tune_garbage_collector()
    ca = CertificateAuthority.load_or_create(state / "identity", "virtfleet identity CA")
    key, cert = ensure_server_cert(ca, state / "bare-tls", server_names("https://127.0.0.1", "127.0.0.1"))
    app = web.Application(client_max_size=wire.MAX_BODY_BYTES)
    app[INTERVAL] = interval
    app.router.add_post(wire.CHECKIN_PATH, checkin)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=server_context(key, cert, ca),
                backlog=1024, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
