"""``tempomq verify``: the offline scrub finds each kind of damage, calls a crash's leftovers
notes, changes nothing, and exits 1 only on damage."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_core import codec
from broker_core.verify import verify
from tempomq import cli
from tests.unit.broker_helpers import no_hang
from tests.unit.store_helpers import (
    Stores,
    crash_copy,
    put_numbered,
    write_at,
)


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    with no_hang(10):
        yield


def fingerprint(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def stopped_store(stores: Stores, data_dir: Path, n: int = 30) -> list:  # type: ignore[type-arg]
    store = await stores.start(data_dir)
    await store.create_topic("t", 2)
    rs = await put_numbered(store, "t", n, size=3000)
    await stores.stop(store)
    return rs


async def test_a_clean_directory_is_clean(stores: Stores, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    await stopped_store(stores, tmp_path)
    before = fingerprint(tmp_path)
    report = verify(tmp_path)
    assert not report.damaged and report.findings == []
    assert (report.records, report.queue_entries) == (30, 30)
    assert report.index_entries == 60  # an id and a key per message
    assert cli.main(["verify", "--data-dir", str(tmp_path)]) == 0
    assert "verdict: clean" in capsys.readouterr().out
    assert fingerprint(tmp_path) == before  # read only


async def test_corrupt_record_mid_log_is_damage(stores: Stores, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rs = await stopped_store(stores, tmp_path)
    write_at(tmp_path, rs[10].phy_offset + 200, b"\x5a" * 16)
    before = fingerprint(tmp_path)
    capsys.readouterr()
    assert cli.main(["verify", "--data-dir", str(tmp_path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "damaged"
    wheres = [f["where"] for f in out["findings"] if f["severity"] == "damage"]
    assert any(f"commitlog offset {rs[10].phy_offset}" in w for w in wheres)
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("target", ["consumequeue", "index"])
async def test_derived_file_damage_is_found(stores: Stores, tmp_path: Path, target: str) -> None:
    await stopped_store(stores, tmp_path)
    if target == "consumequeue":
        path = tmp_path / "consumequeue" / "t" / "0" / f"{0:020d}"
        raw = bytearray(path.read_bytes())
        raw[20:28] = (12345).to_bytes(8, "big")  # entry 1 now points into another record
    else:
        path = next((tmp_path / "index").glob("*.idx"))
        raw = bytearray(path.read_bytes())
        header = 64
        slots = int.from_bytes(raw[4:8], "big")
        at = header + slots * 4 + 5 * 20 + 8  # entry 5's offset field
        raw[at : at + 8] = (7).to_bytes(8, "big")
    path.write_bytes(bytes(raw))
    report = verify(tmp_path)
    assert report.damaged
    assert [f.where.split("/")[0] for f in report.findings if f.severity == "damage"] == [target]


async def test_unreadable_json_is_damage(stores: Stores, tmp_path: Path) -> None:
    await stopped_store(stores, tmp_path)
    (tmp_path / "topics.json").write_text("{not json")
    report = verify(tmp_path)
    assert [(f.severity, f.where) for f in report.findings] == [("damage", "topics.json")]


async def test_a_crash_leaves_notes_not_damage(stores: Stores, tmp_path: Path) -> None:
    live, crash = tmp_path / "live", tmp_path / "crash"
    store = await stores.start(live)
    await store.create_topic("t", 1)
    await put_numbered(store, "t", 5, size=100)
    end = await crash_copy(store, live, crash)
    batch_start = end
    write_at(crash, batch_start, b"\x00\x00\x01\x00" + codec.RECORD_MAGIC.to_bytes(4, "big"))
    report = verify(crash)
    assert not report.damaged
    assert report.end == end


async def test_a_missing_segment_and_an_unreadable_format_are_reported(
    stores: Stores, tmp_path: Path
) -> None:
    await stopped_store(stores, tmp_path, n=60)
    segs = sorted((tmp_path / "commitlog").glob("0*"))
    assert len(segs) >= 3
    segs[1].unlink()
    (tmp_path / "commitlog" / "format.json").write_text("{garbage")
    report = verify(tmp_path)
    damage = [f for f in report.findings if f.severity == "damage"]
    assert any("format.json" in f.what for f in damage)
    assert any(f.where.startswith(f"commitlog offset {int(segs[1].name)}") for f in damage)
    assert not any("bytes, expected" in f.what for f in damage)  # sizes judged by the files
