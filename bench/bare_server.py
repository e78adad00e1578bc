"""The ceiling: a trivial aiohttp mTLS JSON handler, served the way virtfleet-server serves.

Same aiohttp, same TLS context (server.tls.server_context: the server's certificate,
client certificates checked against the identity CA), same TLS buffer setting, same
path. The handler only parses the JSON body and answers a CheckinResponse-sized JSON:
whatever the real server is slower by is the application's own work.

Usage: bare_server.py STATE_DIR PORT   (STATE_DIR: a seeded server state dir)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aiohttp import web

from common import wire
from server.ca import CertificateAuthority
from server.tls import ensure_server_cert, limit_tls_buffers, server_context, server_names

ANSWER = {"host_id": "0123456789ab", "status": "connecting", "enabled": True, "role": "mixed",
          "detail": "waiting for the agent to report libvirtd's TLS endpoint",
          "checkin_interval": 10.0, "renew": False}


async def checkin(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.json_response(ANSWER)


def main() -> int:
    state, port = Path(sys.argv[1]), int(sys.argv[2])
    limit_tls_buffers()
    ca = CertificateAuthority.load_or_create(state / "identity", "virtfleet identity CA")
    key, cert = ensure_server_cert(ca, state / "bare-tls", server_names("https://127.0.0.1", "127.0.0.1"))
    app = web.Application(client_max_size=wire.MAX_BODY_BYTES)
    app.router.add_post(wire.CHECKIN_PATH, checkin)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=server_context(key, cert, ca),
                backlog=1024, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
