"""TLS for the listeners: the server context, and a client certificate's subject as text.

With ``--tls-client-ca`` the server asks for a client certificate and verifies any it gets
against that CA, but does not require one (``CERT_OPTIONAL``): clients with a bearer token need
no certificate. A verified certificate's subject, written ``CN=billing,O=shop`` in the order the
certificate lists it, is looked up in the auth file's ``cert_subject`` entries.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

#: Short names of the subject attributes, as RFC 4514 writes them.
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
    "domainComponent": "DC",
}


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; raises ``OSError``/``ssl.SSLError`` naming a bad file."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def format_subject(subject: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """``ssl.getpeercert()['subject']`` as ``CN=...,O=...``."""
    return ",".join(f"{_SHORT.get(k, k)}={v}" for rdn in subject for k, v in rdn)


def peer_subject(transport: asyncio.BaseTransport | None) -> str | None:
    """The verified client certificate's subject on this connection, or None."""
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:  # no TLS, no certificate, or one that did not verify
        return None
    subject = cert.get("subject")
    return format_subject(subject) if subject else None
