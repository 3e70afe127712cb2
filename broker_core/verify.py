"""``tempomq verify``: an offline scrub of a data directory, reading every file and changing none.

It walks every frame of every CommitLog segment (CRC and self-offset of each record, unit
markers, fillers), checks that every ConsumeQueue entry and every index entry points at a valid
record that matches it, and that the JSON files parse. Each problem is a :class:`Finding`:

* ``damage`` — bytes that do not check where data should be: a corrupt record mid-log (recovery
  skips it; its message is lost), a ConsumeQueue or index entry that points at the wrong thing (a
  derived file: delete ``consumequeue/`` or ``index/`` and restart to rebuild it), an unreadable
  JSON file;
* ``note`` — what a crash normally leaves and the next start repairs: a torn last write, entries
  past the end of the log, damage already recorded in ``damage.jsonl``.

:func:`verify` returns a :class:`Report`; the command exits 1 when it holds any damage.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from broker_core import codec
from broker_core.commitlog import CommitLog
from broker_core.consumequeue import ENTRY, ENTRY_SIZE
from broker_core.index import _ENTRY, _ENTRY_SIZE, _HEADER, _HEADER_SIZE, _MAGIC, id_hash, key_hash
from broker_core.message import StoredMessage

_JSON_FILES = (
    "topics.json",
    "deleted-topics.json",
    "checkpoint.json",
    "groups.json",
    "commitlog/format.json",
)


@dataclass(slots=True, frozen=True)
class Finding:
    severity: str  # "damage" or "note"
    where: str
    what: str

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "where": self.where, "what": self.what}


@dataclass(slots=True)
class Report:
    data_dir: Path
    segments: int = 0
    records: int = 0
    writes: int = 0
    end: int = 0
    queue_entries: int = 0
    index_entries: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return any(f.severity == "damage" for f in self.findings)

    def add(self, severity: str, where: str, what: str) -> None:
        self.findings.append(Finding(severity, where, what))

    def to_json(self) -> dict[str, object]:
        return {
            "data_dir": str(self.data_dir),
            "verdict": "damaged" if self.damaged else "clean",
            "segments": self.segments,
            "records": self.records,
            "writes": self.writes,
            "commitlog_end": self.end,
            "queue_entries": self.queue_entries,
            "index_entries": self.index_entries,
            "findings": [f.to_json() for f in self.findings],
        }

    def lines(self) -> list[str]:
        out = [
            f"data directory {self.data_dir}",
            f"commitlog: {self.segments} segments, {self.records} records in {self.writes} "
            f"writes, valid data ends at offset {self.end}",
            f"consume queues: {self.queue_entries} entries; index: {self.index_entries} entries",
        ]
        out += [f"{f.severity.upper():6} {f.where}: {f.what}" for f in self.findings]
        out.append(
            f"verdict: damaged ({sum(f.severity == 'damage' for f in self.findings)} findings)"
            if self.damaged
            else "verdict: clean"
        )
        return out


def verify(data_dir: Path) -> Report:
    """Scrub ``data_dir`` (a stopped server's, or one no server writes to meanwhile)."""
    report = Report(data_dir)
    for name in _JSON_FILES:
        path = data_dir / name
        if path.exists():
            try:
                orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as e:
                report.add("damage", name, f"does not parse ({e})")
    log = CommitLog(data_dir / "commitlog", segment_bytes=1 << 30)
    if not log.dir.is_dir():
        report.add("note", "commitlog", "no CommitLog: an empty data directory")
        return report
    try:
        _verify_log(log, report)
        _verify_queues(log, data_dir / "consumequeue", report)
        _verify_index(log, data_dir / "index", report)
    finally:
        log.close(clean=False)
    for entry in log.damage.entries:
        report.add(
            "note",
            f"commitlog offset {entry['offset']}",
            f"damage recorded {entry['found_by']} at {entry['found_at']}: {entry['reason']}",
        )
    return report


def _verify_log(log: CommitLog, report: Report) -> None:
    for problem in log.open_readonly():
        report.add("damage", "commitlog", problem)
    scan = log.walk(None)
    report.segments = log.segment_count
    report.records, report.writes, report.end = scan.records, scan.units, scan.end
    for lo, hi in scan.damage:
        report.add(
            "damage",
            f"commitlog offset {lo} (segment {log.segment_start(lo)})",
            f"{hi - lo} bytes do not check; valid records follow (the next start skips them)",
        )
    if scan.torn_last_write:
        report.add("note", "commitlog", "the last write is torn (a crash): the next start drops it")
    log.written_end = scan.end


def _record_at(log: CommitLog, phy: int) -> StoredMessage | None:
    if not log.min_offset <= phy < log.written_end:
        return None
    try:
        view, pos = log.view_at(phy)
    except KeyError:
        return None
    if not codec.check_record(view, pos, len(view), phy):
        return None
    return codec.decode(view, pos)


def _verify_queues(log: CommitLog, root: Path, report: Report) -> None:
    if not root.is_dir():
        return
    for qdir in sorted(p for p in root.glob("*/*") if p.is_dir()):
        where = f"consumequeue/{qdir.parent.name}/{qdir.name}"
        files = sorted(p for p in qdir.iterdir() if p.name.isdigit())
        if len({p.stat().st_size for p in files}) > 1:
            report.add("damage", where, "its files differ in size")
        bad: list[str] = []
        past_end = 0
        for path in files:
            b, p = _verify_queue_file(log, qdir.parent.name, qdir.name, path, report)
            bad += b
            past_end += p
        if bad:
            report.add(
                "damage",
                where,
                f"{len(bad)} entries point at no matching record (first: {bad[0]}); delete "
                "consumequeue/ and restart to rebuild it from the CommitLog",
            )
        if past_end:
            report.add("note", where, f"{past_end} entries past the end of the log (dropped)")


def _verify_queue_file(
    log: CommitLog, topic: str, queue: str, path: Path, report: Report
) -> tuple[list[str], int]:
    """The bad entries of one ConsumeQueue file, and how many point past the log's end."""
    start = int(path.name)
    queue_id = int(queue) if queue.isdigit() else -1
    data = path.read_bytes()
    bad: list[str] = []
    past_end = 0
    for i in range(len(data) // ENTRY_SIZE):
        phy, size, _th = ENTRY.unpack_from(data, i * ENTRY_SIZE)
        if size == 0:
            continue
        report.queue_entries += 1
        if phy >= log.written_end:
            past_end += 1
            continue
        if phy < log.min_offset or log.damage.known(phy):
            continue  # retention removed the record, or it is damaged and recorded as such
        m = _record_at(log, phy)
        qoff = start + i
        if m is None or (m.topic, m.queue_id, m.queue_offset, m.size) != (
            topic,
            queue_id,
            qoff,
            size,
        ):
            bad.append(f"entry {qoff} -> offset {phy}")
    return bad, past_end


def _verify_index(log: CommitLog, root: Path, report: Report) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.glob("*.idx")):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEADER_SIZE:
                report.add("damage", f"index/{path.name}", "shorter than its header")
                continue
            view = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        try:
            _verify_index_file(log, path, view, report)
        finally:
            view.close()


def _verify_index_file(log: CommitLog, path: Path, view: mmap.mmap, report: Report) -> None:
    where = f"index/{path.name}"
    magic, slots, capacity, count, _lo, _hi, _clean = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC:
        report.add("damage", where, "not an index file (bad magic)")
        return
    entries_at = _HEADER_SIZE + slots * 4
    if count > capacity or entries_at + capacity * _ENTRY_SIZE > len(view):
        report.add("damage", where, f"header claims {count} of {capacity} entries; file too short")
        return
    bad = 0
    for n in range(count):
        try:
            h, phy, _prev = _ENTRY.unpack_from(view, entries_at + n * _ENTRY_SIZE)
        except struct.error:
            bad += 1
            continue
        report.index_entries += 1
        if phy >= log.written_end or phy < log.min_offset:
            continue
        m = _record_at(log, phy)
        if m is None:
            if not log.damage.known(phy):
                bad += 1
            continue
        if h != id_hash(m.msg_id) and all(h != key_hash(m.topic, k) for k in m.keys):
            bad += 1
    if bad:
        report.add(
            "damage",
            where,
            f"{bad} entries point at no matching record; delete index/ and restart to rebuild it",
        )
