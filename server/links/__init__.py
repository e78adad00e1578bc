"""Reaching each host's libvirtd: the per-host link manager and how a link is opened.

manager.py   one task per enabled host: wait until it may be dialled, open, watch, retry
opener.py    opens a libvirt connection through a relay the server controls
relay.py     the byte relay between a libvirt client's unix socket and a host's libvirtd
direct.py    dials a host's libvirtd over TLS and checks it is that host's
pki.py       the server's libvirt client identity (key, certificate, the libvirt CA)
"""
