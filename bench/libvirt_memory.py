"""What one host's libvirt connection costs the server: COUNT `qemu+tls` connections to
one libvirtd, opened as the connection manager opens them (the server's pkipath,
keepalive, a close callback, libvirt's event thread), and the resident memory each one
added, in KB, as one JSON line.

Usage: libvirt_memory.py URI COUNT   (run where the server runs: in its namespace)
"""

from __future__ import annotations

import json
import os
import sys

import libvirt

from bench.util import rss_mb
from common import libvirt_events
from server.links.opener import KEEPALIVE_COUNT, KEEPALIVE_INTERVAL


def main() -> int:
    uri, count = sys.argv[1], int(sys.argv[2])
    libvirt_events.start()
    conns = [libvirt.open(uri)]  # the first one loads GnuTLS and libvirt's client state
    before = rss_mb(os.getpid())
    for _ in range(count):
        conn = libvirt.open(uri)
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        conn.registerCloseCallback(lambda *_: None, None)
        conns.append(conn)
    print(json.dumps({"kb_each": (rss_mb(os.getpid()) - before) * 1024 / count}))
    for conn in conns:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
