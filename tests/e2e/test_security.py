"""``tempomq serve`` with auth, limits and TLS, as a process: the safe default bind, tokens from
the environment and the auth file, SIGHUP reload, the CLI and SDK with credentials, 429s, the
header timeout on the real listener, HTTPS with client certificates."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tempomq.auth import hash_token, new_token
from tempomq.client import Client, Forbidden, Unauthenticated
from tests.auth_helpers import (
    ADMIN_TOKEN,
    NEIGHBOUR_TOKEN,
    OWNER_TOKEN,
    bearer,
    write_auth_file,
)
from tests.certs import CertificateAuthority
from tests.e2e.server import Server, clean_env, free_port, probe_ok, run_tempomq

pytestmark = pytest.mark.e2e


def test_a_network_address_without_auth_is_refused_at_start(tmp_path: Path) -> None:
    result = run_tempomq(
        "serve", "--http", f"0.0.0.0:{free_port()}", "--data-dir", str(tmp_path / "d"),
        env=clean_env(),
    )
    assert result.returncode == 2
    assert "not a loopback address and auth is off" in result.stderr
    assert not (tmp_path / "d").exists(), "nothing was started"


def test_a_bad_auth_file_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "auth.yaml"
    bad.write_text("principals:\n  x: {allow: {'topic:orders': [fly]}}\n")
    result = run_tempomq(
        "serve", "--http", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "d"),
        "--auth-file", str(bad), "--log-format", "json",
        env=clean_env(),
    )
    assert result.returncode == 1
    assert "principals.x.allow" in result.stdout + result.stderr


@pytest.fixture
def auth_server(tmp_path: Path) -> Any:
    server = Server(
        tmp_path / "data",
        "--auth-file",
        str(write_auth_file(tmp_path / "auth.yaml")),
        "--header-timeout",
        "1s",
        env={"TEMPOMQ_ADMIN_TOKEN": "tmq_bootstrap-admin-0123456789abcdef"},
    )
    server.start()
    yield server
    server.ensure_stopped()


async def test_the_cli_and_the_sdk_use_the_token(auth_server: Server) -> None:
    url = auth_server.url
    base = clean_env(TEMPOMQ_URL=url)
    denied = run_tempomq("topic", "list", env=base)
    assert denied.returncode == 6 and "unauthorized" in denied.stderr
    made = run_tempomq(
        "topic", "create", "orders",
        env={**base, "TEMPOMQ_TOKEN": "tmq_bootstrap-admin-0123456789abcdef"},
    )
    assert made.returncode == 0, made.stderr
    forbidden = run_tempomq("topic", "create", "more", env={**base, "TEMPOMQ_TOKEN": OWNER_TOKEN})
    assert forbidden.returncode == 6 and "lacks admin on cluster" in forbidden.stderr
    async with Client(url, token=OWNER_TOKEN) as client:
        await client.send("orders", "hello")
        got = await client.receive("orders", "billing", wait_ms=2000)
        assert [m.body for m in got] == [b"hello"]
    async with Client(url, token=NEIGHBOUR_TOKEN) as client:
        with pytest.raises(Forbidden, match="produce on topic:orders"):
            await client.send("orders", "not mine")
    async with Client(url, token="") as client:
        with pytest.raises(Unauthenticated):
            await client.send("orders", "anonymous")


async def test_sighup_reloads_the_auth_file(auth_server: Server, tmp_path: Path) -> None:
    late = new_token()
    write_auth_file(tmp_path / "auth.yaml", {"late": {"tokens_sha256": [hash_token(late)]}})
    assert auth_server.proc is not None
    auth_server.proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as session:
        status = 0
        for _ in range(200):
            async with session.get(f"{auth_server.url}/v1/topics", headers=bearer(late)) as r:
                status = r.status
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200, auth_server.log()
        async with session.get(f"{auth_server.url}/v1/topics", headers=bearer(OWNER_TOKEN)) as r:
            assert r.status == 401
    assert auth_server.proc.poll() is None, "SIGHUP must not stop the server"


async def test_the_real_listener_cuts_a_silent_connection(auth_server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", auth_server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(), 30)
    except ConnectionResetError:
        data = b""
    assert data == b""
    writer.close()


async def test_over_the_rate_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", "--rate-limit", "1", "--rate-burst", "3")
    server.start()
    try:
        async with aiohttp.ClientSession() as session:
            answers = []
            for _ in range(10):
                async with session.get(f"{server.url}/v1/topics") as r:
                    answers.append((r.status, r.headers.get("Retry-After"), await r.json()))
        assert [a[0] for a in answers[:3]] == [200, 200, 200]
        limited = [a for a in answers if a[0] == 429]
        assert limited, answers
        _, retry_after, body = limited[0]
        assert retry_after is not None and int(retry_after) >= 1
        assert body["error"] == "too_many_requests"
    finally:
        server.ensure_stopped()


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Any:
    ca = CertificateAuthority(tmp_path)
    server_pair = ca.issue("server", "localhost", server=True)
    principals = {
        "ops": {"admin": True, "tokens_sha256": [hash_token(ADMIN_TOKEN)]},
        "billing": {"cert_subject": "CN=billing,O=shop", "allow": {"topic:orders": ["produce"]}},
    }
    server = Server(
        tmp_path / "data",
        "--auth-file", str(write_auth_file(tmp_path / "auth.yaml", principals)),
        "--tls-cert", str(server_pair.cert),
        "--tls-key", str(server_pair.key),
        "--tls-client-ca", str(ca.pair.cert),
    )
    server.start()
    yield server, ca
    server.ensure_stopped()


async def test_https_with_the_ca_file_and_a_token(tls_server: tuple[Server, Any]) -> None:
    server, ca = tls_server
    assert server.url.startswith("https://")
    async with Client(server.url, token=ADMIN_TOKEN, ca_file=ca.pair.cert) as client:
        await client.create_topic("orders")
    # Without the CA the server's certificate is not trusted.
    async with Client(server.url, token=ADMIN_TOKEN, retries=0) as client:
        with pytest.raises(Exception, match=r"(?i)certificate"):
            await client.create_topic("other")
    # Plain HTTP to the TLS port gets no answer.
    plain = server.url.replace("https://", "http://")
    async with Client(plain, token=ADMIN_TOKEN, retries=0, timeout_s=5) as client:
        with pytest.raises(Exception):  # noqa: B017 - any failure: there is no HTTP there
            await client.create_topic("other")


async def test_a_client_certificate_names_its_principal(tls_server: tuple[Server, Any]) -> None:
    server, ca = tls_server
    async with Client(server.url, token=ADMIN_TOKEN, ca_file=ca.pair.cert) as client:
        await client.create_topic("orders")

    def context(cert: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=ca.pair.cert)
        if cert is not None:
            ctx.load_cert_chain(cert.cert, cert.key)
        return ctx

    billing = ca.issue("billing", "billing", org="shop")
    async with Client(server.url, token="", ssl_context=context(billing)) as client:
        await client.send("orders", "by certificate")  # allowed: produce on orders
        with pytest.raises(Forbidden, match="'billing' lacks consume on topic:orders"):
            await client.receive("orders", "g")
    unknown = ca.issue("unknown", "someone-else")
    async with Client(server.url, token="", ssl_context=context(unknown)) as client:
        with pytest.raises(Unauthenticated, match="not mapped to a principal"):
            await client.send("orders", "x")
    # A certificate from another CA is not accepted.
    (ca.directory / "other").mkdir()
    other = CertificateAuthority(ca.directory / "other", "other CA").issue(
        "stranger", "billing", org="shop"
    )
    async with Client(server.url, token="", ssl_context=context(other), retries=0) as client:
        with pytest.raises(Exception):  # noqa: B017 - the handshake fails
            await client.send("orders", "x")



async def test_the_in_server_probe_runs_with_auth_on(tmp_path: Path) -> None:
    server = Server(
        tmp_path / "data",
        "--probe-interval", "2s", "--probe-duration", "1s", "--probe-rate", "20",
        env={"TEMPOMQ_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    server.start()
    try:
        async with aiohttp.ClientSession(headers=bearer(ADMIN_TOKEN)) as session:
            ok, _ = await probe_ok(session, server.url)
        assert ok == 1.0, server.log()
    finally:
        server.ensure_stopped()
