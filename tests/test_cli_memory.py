"""The ``keyguard`` command's memory stays flat on a large store (200,000 keys of one user).

Before keyset paging, ``list --user`` on this store peaked at 387 MB, ``list --json`` at
1,080 MB and ``scan`` without ``--prefix`` at 298 MB; paged, each stays near 30 MB.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyguard import SQLiteStore
from keyguard.stores._sqlite_layout import pack_metadata, row_id

KEYS = 200_000
# Flat is about 30 MB (the interpreter and one page); holding every key took 298 MB and up.
PEAK_BOUND_MB = 100


@pytest.fixture(scope="module")
def large_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store holding ``KEYS`` keys of user ``U``, written directly for speed."""
    path = tmp_path_factory.mktemp("large") / "keys.db"
    SQLiteStore(path).close()
    metadata = pack_metadata(json.dumps({"user_id": "U"}, separators=(",", ":")), "U")
    rows = (
        (row_id(f"{n:064x}"), n.to_bytes(32, "big"), f"key_{n:016x}", 1, None,
         f"sk_…{n % 65536:04x}", "U", metadata,
         1_700_000_000 + n // 4)  # four keys to a second: ties that page boundaries split
        for n in range(KEYS)
    )  # fmt: skip
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO keyguard_hash_schemes (id, name) VALUES (1, 'sha256')")
        conn.executemany(
            "INSERT INTO keyguard_records (id, digest, key_id, scheme, prefix, hint, user_id,"
            " metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return path


# Runs one command and reports its peak RSS (KiB on Linux) on stderr: the wrapper has only
# that child, so RUSAGE_CHILDREN is the command's own peak, not the largest process this
# test run ever started.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


@dataclass
class Run:
    code: int
    peak_mb: float
    out: Path


def run_all(store: Path, tmp_path: Path, commands: dict[str, list[str]]) -> dict[str, Run]:
    """Run the commands side by side; return each one's exit code, peak RSS and output."""
    # Without coverage's tracer, which the suite may put in every child: it is the command's
    # own memory that is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_", "COVERAGE_"))}
    env.update(KEYGUARD_STORE=f"sqlite:///{store}", COLUMNS="80", PYTHONIOENCODING="utf-8")
    started = {}
    for name, args in commands.items():
        out = tmp_path / f"{name}.out"
        with open(out, "wb") as f:
            started[name] = subprocess.Popen(
                [sys.executable, "-c", _MEASURE, sys.executable, "-m", "keyguard", *args],
                stdout=f,
                stderr=subprocess.PIPE,
                env=env,
                cwd=tmp_path,
            )
    runs = {}
    for name, process in started.items():
        _, err = process.communicate(timeout=300)
        peak_kib = int(err.splitlines()[-1])
        runs[name] = Run(process.returncode, peak_kib / 1024, tmp_path / f"{name}.out")
    return runs


def test_list_and_scan_keep_memory_flat_on_a_large_store(
    large_store: Path, tmp_path: Path
) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "notes.txt").write_text("no keys here\n")

    runs = run_all(
        large_store,
        tmp_path,
        {
            "table": ["list", "--user", "U"],
            "json": ["list", "--user", "U", "--json"],
            "scan": ["scan", "tree"],  # no --prefix: it reads the store for its prefixes
        },
    )

    peaks = {name: round(run.peak_mb) for name, run in runs.items()}
    assert all(run.peak_mb < PEAK_BOUND_MB for run in runs.values()), peaks
    assert [runs[name].code for name in ("table", "json", "scan")] == [0, 0, 0]
    with open(runs["table"].out, encoding="utf-8") as table:
        assert next(table).startswith("KEY_ID ")
        assert sum(1 for line in table if line.rstrip().endswith(" active")) == KEYS
    with open(runs["json"].out, encoding="utf-8") as listing:
        assert next(listing) == "{\n"
        assert next(listing) == '  "keys": [\n'
        key_ids = [line.split('"')[3] for line in listing if line.startswith('      "key_id"')]
    assert key_ids == [f"key_{n:016x}" for n in range(KEYS)]  # each once, in order
    with open(runs["json"].out, "rb") as listing:
        listing.seek(-16, os.SEEK_END)
        assert listing.read().endswith(b"    }\n  ]\n}\n")
    assert "Scanned 1 file(s): no keys found." in runs["scan"].out.read_text(encoding="utf-8")
