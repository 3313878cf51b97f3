"""The hash-chained local log: every kind of tampering is caught, with the line that was hit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepguard.audit import AuditLog, ChainHead, read_head, verify_chain
from stepguard.audit._chain import encode_record
from stepguard.cli import main
from stepguard.errors import AuditError, ConfigurationError


def make_log(path: Path, n: int = 6) -> Path:
    log = AuditLog(path)
    for i in range(n):
        log.append("note", {"i": i, "text": f"record {i}"})
    log.close()
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write(path: Path, parts: list[bytes]) -> None:
    path.write_bytes(b"".join(parts))


def broken_line(path: Path, **kw) -> int:
    with pytest.raises(AuditError) as info:
        verify_chain(path, **kw)
    assert info.value.subject.startswith("line ")
    return int(info.value.subject.split()[1])


def test_intact_log_verifies(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    report = verify_chain(log)
    assert report.records == 7 and report.tail_anchored
    assert report.kinds == {"genesis": 1, "note": 6}
    assert report.head == read_head(log)


def test_edited_record_is_caught(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    parts = lines(log)
    parts[3] = parts[3].replace(b"record 2", b"record X")
    write(log, parts)
    assert broken_line(log) == 4


def test_edited_record_with_recomputed_digest_breaks_the_next_link(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    parts = lines(log)
    rec = json.loads(parts[3])
    rec["text"] = "forged"
    parts[3] = encode_record(rec)
    write(log, parts)
    assert broken_line(log) == 5


def test_deleted_record_is_caught(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    parts = lines(log)
    del parts[2]
    write(log, parts)
    assert broken_line(log) == 3


def test_deleted_genesis_is_caught(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    write(log, lines(log)[1:])
    assert broken_line(log) == 1


def test_inserted_record_is_caught(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    parts = lines(log)
    prev = json.loads(parts[2])
    forged = {"v": 1, "seq": prev["seq"] + 1, "prev": prev["digest"], "kind": "note",
              "ts_ns": prev["ts_ns"], "text": "inserted"}
    parts.insert(3, encode_record(forged))
    write(log, parts)
    assert broken_line(log) == 5  # the forged record links fine; the original after it does not


def test_reordered_records_are_caught(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    parts = lines(log)
    parts[2], parts[3] = parts[3], parts[2]
    write(log, parts)
    assert broken_line(log) == 3


def test_truncated_tail_is_caught_by_the_head_file(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    write(log, lines(log)[:-2])
    assert broken_line(log) == 6


def test_without_head_a_cut_tail_needs_an_anchor(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    anchor = read_head(log)
    assert anchor is not None
    write(log, lines(log)[:-1])
    Path(str(log) + ".head").unlink()
    report = verify_chain(log)  # honest limit: nothing left in the log says it was longer
    assert not report.tail_anchored
    with pytest.raises(AuditError):
        verify_chain(log, require_head=True)
    assert broken_line(log, anchor=anchor) == 7


def test_partial_final_record_is_caught(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    data = log.read_bytes()
    log.write_bytes(data[:-20])
    assert broken_line(log) == 7


def test_writer_records_truncation_it_finds_and_verify_reports_it(tmp_path):
    path = make_log(tmp_path / "a.jsonl")
    write(path, lines(path)[:-2])
    log = AuditLog(path)
    log.append("note", {"text": "after the cut"})
    log.close()
    rec = json.loads(lines(path)[-1])
    assert "tail truncated" in rec["anomaly"][0]
    assert broken_line(path) == len(lines(path))


def test_writer_recovers_from_a_crash_between_append_and_head_update(tmp_path):
    path = make_log(tmp_path / "a.jsonl", 3)
    head_path = Path(str(path) + ".head")
    stale = head_path.read_bytes()
    log = AuditLog(path)
    log.append("note", {"text": "x"})
    log.close()
    head_path.write_bytes(stale)  # as if the process died before updating the head
    log = AuditLog(path)
    log.append("note", {"text": "y"})
    log.close()
    assert verify_chain(path).records == 6


_WRITER = """
import sys
from stepguard.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[3])):
    log.append("note", {"who": int(sys.argv[2]), "i": i})
log.close()
"""


def test_concurrent_writer_processes_share_one_chain(tmp_path):
    path = str(tmp_path / "shared.jsonl")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, str(w), "40"])
             for w in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    report = verify_chain(path)
    assert report.records == 1 + 4 * 40
    assert report.kinds == {"genesis": 1, "note": 160}


def test_log_and_head_are_private_files(tmp_path):
    log = make_log(tmp_path / "sub" / "a.jsonl", 1)
    assert os.stat(log).st_mode & 0o777 == 0o600
    assert os.stat(str(log) + ".head").st_mode & 0o777 == 0o600
    assert os.stat(log.parent).st_mode & 0o777 == 0o700


def test_bad_fsync_policy_is_refused(tmp_path):
    with pytest.raises(ConfigurationError):
        AuditLog(tmp_path / "x.jsonl", fsync="sometimes")  # type: ignore[arg-type]


def test_fsync_always_policy_writes_a_valid_chain(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", fsync="always")
    log.append("note", {})
    log = AuditLog(tmp_path / "a.jsonl", fsync="step")
    log.append("note", {})
    log.flush()
    log.close()
    assert verify_chain(tmp_path / "a.jsonl").records == 3


def test_cli_verify_and_show(tmp_path, capsys):
    log = make_log(tmp_path / "a.jsonl")
    assert main(["audit", "verify", str(log)]) == 0
    assert "audit log OK: 7 records, tail anchored" in capsys.readouterr().out
    assert main(["audit", "verify", "--json", str(log)]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 7
    head = read_head(log)
    assert main(["audit", "verify", "--anchor", f"{head.seq}:{head.digest}", str(log)]) == 0
    capsys.readouterr()
    assert main(["audit", "show", str(log)]) == 0
    assert "chain OK (7 records" in capsys.readouterr().out
    parts = lines(log)
    del parts[2]
    write(log, parts)
    assert main(["audit", "verify", str(log)]) == AuditError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("stepguard: error: audit chain broken in a.jsonl: line 3")
    assert "Traceback" not in err
    assert main(["audit", "show", "--json", str(log)]) == 0  # a damaged log is still shown
    assert json.loads(capsys.readouterr().out)["chain"]["ok"] is False
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == AuditError.exit_code


def test_chain_head_anchor_mismatch(tmp_path):
    log = make_log(tmp_path / "a.jsonl")
    assert broken_line(log, anchor=ChainHead(3, "sha256:" + "f" * 64, 0)) == 4


def test_a_forked_child_reopens_the_log_and_keeps_the_chain(tmp_path):
    path = tmp_path / "fork.jsonl"
    log = AuditLog(path)
    log.append("note", {"who": "parent-before"})
    pid = os.fork()
    if pid == 0:  # child: shares the parent's descriptors until it reopens them
        try:
            for i in range(20):
                log.append("note", {"who": "child", "i": i})
        finally:
            os._exit(0)
    for i in range(20):
        log.append("note", {"who": "parent", "i": i})
    _, status = os.waitpid(pid, 0)
    assert status == 0
    log.append("note", {"who": "parent-after"})
    log.close()
    assert verify_chain(path).records == 1 + 1 + 20 + 20 + 1
