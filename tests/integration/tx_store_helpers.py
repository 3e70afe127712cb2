"""Transaction stores for the tests on real databases: the SQL store on MariaDB or PostgreSQL
under a table prefix of its own (tables dropped after), the SQLite store in a temporary file,
and a TCP proxy the tests control to take a database "down" without touching the shared one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator

from sqlalchemy.engine import make_url

from txcoord.sql_store import SqlTxStore
from txcoord.states import TxState
from txcoord.store import TxRow

T0_MS = 1_700_000_000_000


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}_"


def with_prefix(url: str, prefix: str) -> str:
    return make_url(url).update_query_dict({"table_prefix": prefix}).render_as_string(False)


@contextlib.asynccontextmanager
async def own_tables(url: str) -> AsyncIterator[str]:
    """A store URL on ``url``'s database with a table prefix of its own; the tables are dropped
    on the way out."""
    shared = with_prefix(url, unique_prefix())
    try:
        yield shared
    finally:
        cleanup = SqlTxStore(shared)
        await cleanup.open()
        try:
            await cleanup.drop()
        finally:
            await cleanup.close()


def make_row(
    *,
    tx_id: str | None = None,
    state: TxState = TxState.PREPARED,
    created_at: int = T0_MS,
    next_check_at: int | None = None,
    group: str = "svc",
    check_url: str | None = None,
    record: bytes | None = b"half-message",
    delivered: bool = False,
) -> TxRow:
    due = next_check_at if next_check_at is not None else created_at + 1000
    return TxRow(
        tx_id or os.urandom(16).hex(),
        os.urandom(16),
        "orders",
        group,
        check_url,
        state,
        0,
        due,
        created_at,
        delivered,
        created_at,
        created_at,
        record,
        due_at=due if state is TxState.PREPARED else None,
    )


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`cut` drops every connection and refuses
    new ones (the database is "down" for whoever connects through it), :meth:`restore` lets
    them through again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        for t in pipes:
            t.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()
            self._conns.discard(dst)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()  # the same port

    async def close(self) -> None:
        await self.cut()
        for t in list(self._tasks):
            t.cancel()
