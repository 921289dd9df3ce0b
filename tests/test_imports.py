"""Importing djangorestframework-api-key keys: a real drf-api-key database, made by Django
in a subprocess (``tests/drf_child.py``), imported into keyguard; the callers' drf keys then
work through the manager, both middlewares and the CLI, as native keys do."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from werkzeug.test import Client

from keyguard import APIKeyManager, InvalidKeyError, KeyStore, Reason, SQLiteStore
from keyguard.asgi import APIKeyMiddleware as ASGIMiddleware
from keyguard.imports import DRF_TABLE, ImportReport, Row, import_drf_api_keys
from keyguard.wsgi import APIKeyMiddleware as WSGIMiddleware
from tests.helpers import CountingStore
from tests.stores.services import open_store, require_postgres, unique_name

ROOT = Path(__file__).resolve().parent.parent
ACTIVE = ("alice", "bob", "later")
PEPPER = "p" * 32


@dataclass(frozen=True)
class DrfDatabase:
    """A drf-api-key database and the plaintext keys its ``create_key`` returned."""

    path: Path
    keys: dict[str, str] = field(repr=False)  # a failing test must not print them
    prefixes: dict[str, str]

    def copy(self, folder: Path) -> DrfDatabase:
        """The same database in another file, for a test that changes it."""
        path = folder / "drf-copy.sqlite3"
        shutil.copyfile(self.path, path)
        return DrfDatabase(path, self.keys, self.prefixes)

    def rows(self) -> list[dict[str, Any]]:
        with closing(sqlite3.connect(self.path)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(f"SELECT * FROM {DRF_TABLE}")]


def drf_child(*args: str) -> None:
    """Run ``tests/drf_child.py``: Django is configured there, never in this process."""
    for module in ("django", "rest_framework", "rest_framework_api_key"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    done = subprocess.run(
        [sys.executable, "-m", "tests.drf_child", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def drf_db(tmp_path_factory: pytest.TempPathFactory) -> DrfDatabase:
    folder = tmp_path_factory.mktemp("drf")
    path, out = folder / "drf.sqlite3", folder / "keys.json"
    drf_child("create", str(path), str(out))
    made = json.loads(out.read_text())
    return DrfDatabase(path, made["keys"], made["prefixes"])


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    with open_store(request.param, tmp_path) as store:
        yield store


def drf_manager(store: KeyStore | None = None, **options: Any) -> APIKeyManager:
    return APIKeyManager(store, accept_imported=["drf-api-key"], **options)


def tampered(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


# -- the import, and the keys afterwards -----------------------------------------------------


def test_imported_drf_keys_authenticate_like_native_keys(
    drf_db: DrfDatabase, store: KeyStore
) -> None:
    manager = drf_manager(store)
    report = import_drf_api_keys(manager, drf_db.path)

    assert [row.prefix for row in report.imported] == [
        drf_db.prefixes[name] for name in ("alice", "bob", "revoked", "expired", "later")
    ]
    rows = {row["prefix"]: row for row in drf_db.rows()}
    for name in ACTIVE:
        info = manager.check(drf_db.keys[name])
        prefix = drf_db.prefixes[name]
        assert info.user_id == name  # by default, the drf name
        assert info.metadata["name"] == name
        assert info.metadata["imported_from"] == {
            "source": "drf-api-key",
            "prefix": prefix,
            "table": DRF_TABLE,
        }
        assert info.prefix == prefix and info.hint == f"{prefix}.…"
        assert info.hash_scheme == "drf-sha512+sha256"
        created = datetime.fromisoformat(rows[prefix]["created"]).replace(tzinfo=timezone.utc)
        assert info.created_at == created
        stored = manager.get_key_info(info.key_id)
        assert stored is not None and stored.digest == info.digest
        assert stored.last_used_at is not None  # a use is recorded, as for a native key
    later = manager.check(drf_db.keys["later"]).expires_at
    assert later is not None
    assert timedelta(days=29) < later - datetime.now(timezone.utc) < timedelta(days=30)
    assert manager.verify(drf_db.keys["revoked"]).reason is Reason.REVOKED
    assert manager.verify(drf_db.keys["expired"]).reason is Reason.EXPIRED
    assert manager.verify(tampered(drf_db.keys["alice"])).reason is Reason.NOT_FOUND
    other_prefix = "Z" + drf_db.keys["alice"][1:]
    assert manager.verify(other_prefix).reason is Reason.NOT_FOUND
    assert manager.verify(drf_db.keys["alice"] + "x").reason is Reason.NOT_FOUND  # any length
    assert manager.verify(drf_db.keys["alice"] + "_").reason is Reason.MALFORMED
    # Native keys are untouched by the option.
    native = manager.generate_key(user_id="carol")
    assert manager.check(native).user_id == "carol"


def test_a_manager_without_accept_imported_refuses_drf_keys_as_malformed(
    drf_db: DrfDatabase,
) -> None:
    importing = drf_manager()
    import_drf_api_keys(importing, drf_db.path)
    plain = APIKeyManager(importing.store)

    with pytest.raises(InvalidKeyError) as exc_info:
        plain.check(drf_db.keys["alice"])
    assert exc_info.value.reason is Reason.MALFORMED
    assert plain.is_well_formed(drf_db.keys["alice"]) is False
    assert importing.is_well_formed(drf_db.keys["alice"]) is True


@pytest.mark.anyio
async def test_async_check_finds_imported_keys(drf_db: DrfDatabase) -> None:
    manager = drf_manager()
    import_drf_api_keys(manager, drf_db.path)
    assert (await manager.averify(drf_db.keys["alice"])).ok
    assert (await manager.averify(drf_db.keys["revoked"])).reason is Reason.REVOKED


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("Xy12Ab34.", id="no secret"),
        pytest.param("Xy12Ab34." + "a" * 129, id="secret too long"),
        pytest.param("Xy12Ab3." + "a" * 32, id="prefix too short"),
        pytest.param("Xy12Ab34-" + "a" * 32, id="no dot"),
        pytest.param("Xy12Ab34." + "a" * 31 + "_", id="not a letter or digit"),
        pytest.param("sk_" + "g" * 32, id="native prefix, not hex"),
        pytest.param(b"Xy12Ab34." + b"a" * 32, id="bytes"),
    ],
)
def test_a_string_of_no_accepted_form_never_reaches_the_store(key: object) -> None:
    store = CountingStore()
    manager = drf_manager(store)
    with pytest.raises(InvalidKeyError) as exc_info:
        manager.check(key)
    assert exc_info.value.reason is Reason.MALFORMED
    assert store.calls["get"] == 0


@pytest.mark.parametrize("length", [1, 20, 31, 40, 128])
def test_a_key_with_a_custom_secret_length_imports_and_authenticates(length: int) -> None:
    # KeyGenerator(secret_key_length=...) changes the secret's length; the hash hides it.
    key = "Xy12Ab34." + secrets.token_hex(64)[:length]
    row = valid_row(hashed_key="sha512$$" + hashlib.sha512(key.encode()).hexdigest())
    manager = drf_manager()

    report = import_drf_api_keys(manager, [row])

    assert [r.prefix for r in report.imported] == ["Xy12Ab34"]
    assert manager.check(key).user_id == "acme"
    with pytest.raises(InvalidKeyError) as exc_info:
        manager.check(key[:-1] + ("0" if key[-1] != "0" else "1"))
    assert exc_info.value.reason is Reason.NOT_FOUND


def test_each_check_is_one_digest_and_one_lookup_for_either_form(drf_db: DrfDatabase) -> None:
    store = CountingStore()
    manager = drf_manager(store, last_used_resolution=None)
    import_drf_api_keys(manager, drf_db.path)
    native = manager.generate_key(user_id="carol")
    store.calls.clear()

    manager.check(native)
    manager.check(drf_db.keys["alice"])
    assert store.calls == {"get": 2}


def test_the_digest_is_keyguards_digest_of_the_stored_sha512(drf_db: DrfDatabase) -> None:
    key = drf_db.keys["alice"]
    [row] = [r for r in drf_db.rows() if r["prefix"] == drf_db.prefixes["alice"]]
    assert row["hashed_key"] == "sha512$$" + hashlib.sha512(key.encode()).hexdigest()
    manager = drf_manager(pepper=PEPPER)
    assert manager.digest(key) == manager.digest(row["hashed_key"])
    assert manager.digest(key) != APIKeyManager(pepper=PEPPER).digest(key)


def test_a_revoked_key_can_be_revoked_by_key_and_rotated_into_a_native_key(
    drf_db: DrfDatabase,
) -> None:
    manager = drf_manager()
    import_drf_api_keys(manager, drf_db.path)

    new = manager.rotate_key(drf_db.keys["alice"], grace=timedelta(0))
    assert new.startswith("sk_")
    assert manager.check(new).user_id == "alice"
    assert manager.verify(drf_db.keys["alice"]).reason is Reason.REVOKED
    assert manager.revoke_key(drf_db.keys["bob"]) is True
    assert manager.verify(drf_db.keys["bob"]).reason is Reason.REVOKED


# -- what the import reports ---------------------------------------------------------------


def test_a_legacy_pbkdf2_row_is_skipped_until_drf_rehashes_it(
    drf_db: DrfDatabase, tmp_path: Path
) -> None:
    db = drf_db.copy(tmp_path)
    manager = drf_manager()
    [skipped] = import_drf_api_keys(manager, db.path).skipped

    assert skipped.prefix == db.prefixes["legacy"]
    assert skipped.key_id is None
    assert "pbkdf2_sha256" in skipped.reason and "rehashes" in skipped.reason
    assert manager.verify(db.keys["legacy"]).reason is Reason.NOT_FOUND

    drf_child("use", str(db.path), db.keys["legacy"])  # its caller, once, against drf-api-key 3
    report = import_drf_api_keys(manager, db.path)
    assert [row.prefix for row in report.imported] == [db.prefixes["legacy"]]
    assert len(report.present) == 5 and not report.skipped
    assert manager.check(db.keys["legacy"]).user_id == "legacy"


def test_a_second_import_is_idempotent(drf_db: DrfDatabase, store: KeyStore) -> None:
    manager = drf_manager(store)
    first = import_drf_api_keys(manager, drf_db.path)
    second = import_drf_api_keys(manager, f"sqlite:///{drf_db.path}")

    assert (len(first.imported), len(first.present), len(first.skipped)) == (5, 0, 1)
    assert (len(second.imported), len(second.present), len(second.skipped)) == (0, 5, 1)
    assert [r.key_id for r in second.present] == [r.key_id for r in first.imported]
    assert [r.status for r in second.present] == [
        "active",
        "active",
        "revoked",
        "expired",
        "active",
    ]
    assert second.summary() == "0 imported, 5 already present, 0 revoked now, 1 skipped"
    assert len(manager.list_keys(include_inactive=True)) == 5


def test_a_key_revoked_in_drf_since_the_import_is_revoked_by_the_next(
    drf_db: DrfDatabase, tmp_path: Path
) -> None:
    db = drf_db.copy(tmp_path)
    manager = drf_manager()
    import_drf_api_keys(manager, db.path)
    with closing(sqlite3.connect(db.path)) as conn, conn:
        conn.execute(f"UPDATE {DRF_TABLE} SET revoked = 1 WHERE prefix = ?", [db.prefixes["bob"]])

    dry = import_drf_api_keys(manager, db.path, dry_run=True)
    assert [row.prefix for row in dry.revoked] == [db.prefixes["bob"]]
    assert manager.verify(db.keys["bob"]).ok
    report = import_drf_api_keys(manager, db.path)
    assert [row.prefix for row in report.revoked] == [db.prefixes["bob"]]
    assert manager.verify(db.keys["bob"]).reason is Reason.REVOKED
    assert not import_drf_api_keys(manager, db.path).revoked


def test_a_dry_run_writes_nothing(drf_db: DrfDatabase) -> None:
    store = CountingStore()
    report = import_drf_api_keys(drf_manager(store), drf_db.path, dry_run=True)

    assert len(report.imported) == 5 and len(report.skipped) == 1
    assert report.summary().startswith("5 would be imported,")
    assert store.calls["add"] == store.calls["revoke"] == 0
    assert store.list_keys() == []


def test_user_id_is_one_string_or_a_function_of_the_row(drf_db: DrfDatabase) -> None:
    fixed = drf_manager()
    import_drf_api_keys(fixed, drf_db.path, user_id="acme")
    assert {k.user_id for k in fixed.list_keys(include_inactive=True)} == {"acme"}

    def owner(row: Row) -> str:
        if row["name"] == "bob":
            raise ValueError("bob has left")
        return f"org-{row['name']}"

    mapped = drf_manager()
    report = import_drf_api_keys(mapped, drf_db.path, user_id=owner)
    assert mapped.check(drf_db.keys["alice"]).user_id == "org-alice"
    bob = [r for r in report.skipped if r.prefix == drf_db.prefixes["bob"]]
    assert bob[0].reason == "user_id: ValueError: bob has left"

    with pytest.raises(ValueError, match="user_id"):
        import_drf_api_keys(fixed, drf_db.path, user_id=" ")


def test_a_pepper_applies_to_imported_keys_and_a_wrong_one_is_reported(
    drf_db: DrfDatabase, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "keys.db")
    peppered = drf_manager(store, pepper=PEPPER)
    import_drf_api_keys(peppered, drf_db.path)
    info = peppered.check(drf_db.keys["alice"])
    assert info.hash_scheme == "drf-sha512+" + peppered.hash_scheme
    assert info.hash_scheme.startswith("drf-sha512+hmac-sha256:")

    other = drf_manager(store, pepper="q" * 32)
    report = import_drf_api_keys(other, drf_db.path)
    assert not report.imported and not report.present
    assert all("another KEYGUARD_PEPPER" in row.reason for row in report.skipped[:5])
    store.close()


def valid_row(**changes: Any) -> dict[str, Any]:
    key = "Xy12Ab34." + "s" * 32
    row = {
        "id": "ignored",
        "prefix": "Xy12Ab34",
        "hashed_key": "sha512$$" + hashlib.sha512(key.encode()).hexdigest(),
        "name": "acme",
        "revoked": False,
        "expiry_date": None,
        "created": datetime(2024, 5, 1, 12, tzinfo=timezone.utc),
    }
    return {**row, **changes}


@pytest.mark.parametrize(
    "row, reason",
    [
        pytest.param({"hashed_key": None}, "hashed_key is not a drf-api-key hash", id="no hash"),
        pytest.param(
            {"hashed_key": "sha512$$" + "0" * 127},
            "hashed_key is a malformed sha512 hash",
            id="short sha512",
        ),
        pytest.param(
            {"hashed_key": "argon2$argon2id$v=19$m=102400,t=2,p=8$c2FsdA$aGFzaA"},
            "hashed with Django's argon2 hasher",
            id="argon2",
        ),
        pytest.param({"prefix": "short"}, "prefix is not 8 ASCII letters", id="short prefix"),
        pytest.param({"prefix": None}, "prefix is not 8 ASCII letters", id="no prefix"),
        pytest.param({"revoked": "yes"}, "revoked is not a boolean", id="revoked text"),
        pytest.param({"created": "yesterday"}, "created is not a valid date", id="created text"),
        pytest.param({"created": None}, "created is empty", id="no created"),
        pytest.param({"expiry_date": 3}, "expiry_date is a int", id="expiry number"),
        pytest.param(
            {"expiry_date": datetime(9999, 1, 1, tzinfo=timezone.utc)},
            "expiry_date is after 9000-01-01",
            id="expiry too late",
        ),
        pytest.param({"name": ""}, "its name is empty, so it has no user_id", id="no name"),
        pytest.param({"name": 7}, "name is a int, not text", id="name number"),
    ],
)
def test_a_malformed_row_is_skipped_with_its_reason(row: dict[str, Any], reason: str) -> None:
    manager = drf_manager()
    bad = valid_row(**row)
    good = valid_row(prefix="Good1234", hashed_key="sha512$$" + "a" * 128)
    report = import_drf_api_keys(manager, [bad, good])

    [skipped] = report.skipped
    assert skipped.reason.startswith(reason)
    assert [r.prefix for r in report.imported] == ["Good1234"]
    assert len(manager.list_keys(include_inactive=True)) == 1  # never half a row
    assert "0" * 32 not in skipped.reason and "$c2FsdA$" not in skipped.reason


def test_rows_that_are_not_rows_or_lack_a_column_are_skipped() -> None:
    without_name = valid_row()
    del without_name["name"]
    report = import_drf_api_keys(drf_manager(), [["a", "b"], without_name])  # type: ignore[list-item]
    assert [r.reason for r in report.skipped] == [
        "not a row: a mapping of columns to values, not list",
        "the row has no 'name' column",
    ]
    assert report.table is None


def test_rows_as_mappings_import_with_naive_times_read_as_utc() -> None:
    manager = drf_manager()
    naive = valid_row(created="2024-05-01 12:00:00.250000", revoked=1)
    import_drf_api_keys(manager, [naive])
    [info] = manager.list_keys(include_inactive=True)
    assert info.created_at == datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=timezone.utc)
    assert info.revoked_at is not None
    assert "table" not in info.metadata["imported_from"]


@pytest.mark.parametrize(
    "source, table, message",
    [
        pytest.param("missing.sqlite3", DRF_TABLE, "no SQLite database at", id="missing file"),
        pytest.param("DB", "nope", 'cannot read table "nope"', id="missing table"),
        pytest.param("DB", "x; DROP TABLE y", "invalid table name", id="bad table name"),
        pytest.param(
            "postgresql://nobody:secret@127.0.0.1:1/none",
            DRF_TABLE,
            "cannot connect to postgresql://nobody:***@",
            id="unreachable postgres",
        ),
    ],
)
def test_a_source_that_cannot_be_read_is_a_value_error(
    drf_db: DrfDatabase, tmp_path: Path, source: str, table: str, message: str
) -> None:
    source = str(drf_db.path) if source == "DB" else source
    with pytest.raises(ValueError, match="^" + re.escape(message)) as exc_info:
        import_drf_api_keys(drf_manager(), source, table=table)
    assert "secret" not in str(exc_info.value)
    assert not (tmp_path / "missing.sqlite3").exists()


def test_a_table_without_the_drf_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"CREATE TABLE {DRF_TABLE} (id TEXT, created TEXT, name TEXT, revoked INT)")
    with pytest.raises(ValueError, match="has no column prefix, hashed_key, expiry_date"):
        import_drf_api_keys(drf_manager(), path)


def test_an_open_connection_is_read_and_left_open(drf_db: DrfDatabase) -> None:
    with closing(sqlite3.connect(drf_db.path)) as db:
        report = import_drf_api_keys(drf_manager(), db)
        assert len(report.imported) == 5
        assert db.execute("SELECT 1").fetchone() == (1,)


def test_bad_arguments_are_refused_before_anything_is_read() -> None:
    manager = drf_manager()
    with pytest.raises(TypeError, match="source must be a SQLite path"):
        import_drf_api_keys(manager, 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="user_id must be a str or a function, not int"):
        import_drf_api_keys(manager, [], user_id=7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid table name"):
        import_drf_api_keys(manager, [], table="a.b.c")


def test_a_user_id_function_must_return_text() -> None:
    def number(row: Row) -> Any:
        return 7

    report = import_drf_api_keys(drf_manager(), [valid_row()], user_id=number)
    assert [r.reason for r in report.skipped] == ["user_id returned a int, not a str"]


def test_an_unknown_imported_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown imported key form 'devise'"):
        APIKeyManager(accept_imported=["devise"])
    with pytest.raises(TypeError, match="list of sources"):
        APIKeyManager(accept_imported="drf-api-key")


# -- through the middlewares ---------------------------------------------------------------


@pytest.mark.anyio
async def test_the_asgi_middleware_admits_an_imported_key(drf_db: DrfDatabase) -> None:
    manager = drf_manager()
    import_drf_api_keys(manager, drf_db.path)

    async def whoami(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.user.display_name)

    app = ASGIMiddleware(Starlette(routes=[Route("/me", whoami)]), manager=manager)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        key = drf_db.keys["alice"]
        bearer = await client.get("/me", headers={"Authorization": f"Bearer {key}"})
        header = await client.get("/me", headers={"X-API-Key": key})
        wrong = await client.get("/me", headers={"X-API-Key": tampered(key)})
        revoked = await client.get("/me", headers={"X-API-Key": drf_db.keys["revoked"]})
    assert (bearer.status_code, bearer.text) == (200, "alice")
    assert (header.status_code, header.text) == (200, "alice")
    assert wrong.status_code == 401
    assert revoked.status_code == 401
    assert revoked.json()["code"] == "revoked_api_key"


@pytest.mark.anyio
async def test_drf_callers_keep_sending_authorization_api_key(drf_db: DrfDatabase) -> None:
    manager = drf_manager()
    import_drf_api_keys(manager, drf_db.path)

    async def whoami(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.user.display_name)

    key = drf_db.keys["alice"]
    routes = [Route("/me", whoami)]
    plain = ASGIMiddleware(Starlette(routes=routes), manager=manager)
    drf_style = ASGIMiddleware(
        Starlette(routes=routes),
        manager=manager,
        auth_schemes=["Bearer", "Api-Key"],
        strip_credentials=True,
    )
    answers = []
    for app in (plain, drf_style):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answers.append(await client.get("/me", headers={"Authorization": f"Api-Key {key}"}))
    assert answers[0].status_code == 401 and answers[0].json()["code"] == "missing_api_key"
    assert (answers[1].status_code, answers[1].text) == (200, "alice")


def test_the_wsgi_middleware_admits_an_imported_key(drf_db: DrfDatabase) -> None:
    manager = drf_manager()
    import_drf_api_keys(manager, drf_db.path)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return [environ["REMOTE_USER"].encode()]

    client = Client(WSGIMiddleware(app, manager=manager, auth_schemes=["Bearer", "Api-Key"]))
    ok = client.get("/", headers={"X-API-Key": drf_db.keys["bob"]})
    drf_style = client.get("/", headers={"Authorization": f"api-key {drf_db.keys['bob']}"})
    assert (drf_style.status_code, drf_style.get_data(as_text=True)) == (200, "bob")
    wrong = client.get("/", headers={"X-API-Key": tampered(drf_db.keys["bob"])})
    expired = client.get("/", headers={"X-API-Key": drf_db.keys["expired"]})
    assert (ok.status_code, ok.get_data(as_text=True)) == (200, "bob")
    assert wrong.status_code == 401
    assert (expired.status_code, expired.json and expired.json["code"]) == (
        401,
        "expired_api_key",
    )


# -- PostgreSQL ----------------------------------------------------------------------------


def test_a_drf_database_on_postgresql_imports_by_url(tmp_path: Path) -> None:
    import psycopg
    from psycopg import sql

    dsn = require_postgres()
    schema = unique_name("kgtest_drf_")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        out = tmp_path / "keys.json"
        drf_child("create", f"{dsn}#{schema}", str(out))
        keys = json.loads(out.read_text())["keys"]
        manager = drf_manager()
        report = import_drf_api_keys(manager, dsn, table=f"{schema}.{DRF_TABLE}")
        assert (len(report.imported), len(report.skipped)) == (5, 1)
        assert manager.check(keys["alice"]).user_id == "alice"
        assert manager.verify(keys["revoked"]).reason is Reason.REVOKED
        assert manager.verify(keys["expired"]).reason is Reason.EXPIRED
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_the_report_holds_no_key_and_no_hash(drf_db: DrfDatabase) -> None:
    report = import_drf_api_keys(drf_manager(), drf_db.path)
    text = repr(report)
    for key in drf_db.keys.values():
        assert key.split(".")[1] not in text
    for row in drf_db.rows():
        assert row["hashed_key"][-40:] not in text
    assert isinstance(report, ImportReport)


# -- the command line ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def keyguard(folder: Path, *args: str, **env: str) -> Ran:
    """Run ``python -m keyguard`` on the store ``folder/keys.db``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYGUARD_")}
    environ.update(KEYGUARD_STORE=f"sqlite:///{folder / 'keys.db'}", COLUMNS="200", **env)
    environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
    )
    done = subprocess.run(
        [sys.executable, "-m", "keyguard", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=environ,
        cwd=folder,
        timeout=60,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def assert_no_secret(drf_db: DrfDatabase, *texts: str) -> None:
    hashes = [row["hashed_key"] for row in drf_db.rows()]
    for text in texts:
        for key in drf_db.keys.values():
            assert key.split(".")[1] not in text
        for hashed in hashes:
            assert hashed.rpartition("$")[2][-24:] not in text


def test_the_cli_imports_and_reports_each_row(drf_db: DrfDatabase, tmp_path: Path) -> None:
    ran = keyguard(tmp_path, "import", "--from", "drf-api-key", "--database", str(drf_db.path))

    assert ran.code == 1  # a row was skipped
    assert "(a new store file, created now)" in ran.err
    lines = ran.out.splitlines()
    assert lines[0] == f"drf-api-key table {DRF_TABLE}: 6 rows."
    assert lines[1].split() == ["PREFIX", "RESULT", "KEY_ID", "STATUS", "REASON"]
    results = {line.split()[0]: line.split()[1:4] for line in lines[2:-1]}
    alice = drf_manager(SQLiteStore(tmp_path / "keys.db")).check(drf_db.keys["alice"])
    assert results[drf_db.prefixes["alice"]] == ["imported", alice.key_id, "active"]
    assert results[drf_db.prefixes["revoked"]][::2] == ["imported", "revoked"]
    assert results[drf_db.prefixes["expired"]][::2] == ["imported", "expired"]
    assert results[drf_db.prefixes["legacy"]][:3] == ["skipped", "-", "-"]
    assert "pbkdf2_sha256" in lines[-2]
    assert lines[-1] == "5 imported, 0 already present, 0 revoked now, 1 skipped."
    assert_no_secret(drf_db, ran.out, ran.err)

    again = keyguard(
        tmp_path, "import", "--from", "drf-api-key", "--database", str(drf_db.path), "--json"
    )
    report = json.loads(again.out)
    assert (again.code, report["imported"], report["present"], report["skipped"]) == (1, 0, 5, 1)
    assert {row["result"] for row in report["rows"]} == {"present", "skipped"}
    assert_no_secret(drf_db, again.out, again.err)


def test_the_cli_verifies_shows_and_rotates_an_imported_key(
    drf_db: DrfDatabase, tmp_path: Path
) -> None:
    keyguard(tmp_path, "import", "--from", "drf-api-key", "--database", str(drf_db.path))
    key, prefix = drf_db.keys["bob"], drf_db.prefixes["bob"]

    ok = keyguard(tmp_path, "verify", key)
    assert (
        ok.code == 0 and ok.out.startswith("ok: key_") and f"({prefix}.…) of user 'bob'" in ok.out
    )
    shown = keyguard(tmp_path, "show", key)
    assert "hashed as  drf-sha512+sha256" in shown.out
    wrong = keyguard(tmp_path, "show", tampered(key))
    assert (wrong.code, wrong.err.splitlines()[-1]) == (
        1,
        f"keyguard: error: no such key {prefix}.…",
    )
    rotated = keyguard(tmp_path, "rotate", key, "--grace", "0s")
    assert rotated.code == 0 and re.search(r"\bsk_[0-9a-f]{32}\b", rotated.out)
    assert keyguard(tmp_path, "verify", key).out.startswith("revoked: key_")
    assert_no_secret(drf_db, ok.out, shown.out, wrong.err)


def test_a_cli_dry_run_creates_no_store(drf_db: DrfDatabase, tmp_path: Path) -> None:
    ran = keyguard(
        tmp_path, "import", "--from", "drf-api-key", "--database", str(drf_db.path), "--dry-run"
    )
    assert ran.code == 1
    assert ran.out.startswith("Dry run, nothing written: drf-api-key table")
    assert ran.out.endswith(
        "5 would be imported, 0 already present, 0 would be revoked now, 1 skipped.\n"
    )
    assert not (tmp_path / "keys.db").exists()


def test_the_cli_takes_the_owner_from_an_option_or_a_column(
    drf_db: DrfDatabase, tmp_path: Path
) -> None:
    database = ("--from", "drf-api-key", "--database", str(drf_db.path), "--json")
    fixed = json.loads(keyguard(tmp_path, "import", *database, "--user-id", "acme").out)
    assert fixed["imported"] == 5
    users = json.loads(keyguard(tmp_path, "list", "--all", "--json").out)["keys"]
    assert {user["user_id"] for user in users} == {"acme"}

    other = tmp_path / "other"
    other.mkdir()
    by_column = json.loads(keyguard(other, "import", *database, "--user-column", "name").out)
    assert by_column["imported"] == 5
    missing = json.loads(keyguard(other, "import", *database, "--user-column", "org_id").out)
    assert missing["present"] == 5  # found by digest before the owner matters
    third = tmp_path / "third"
    third.mkdir()
    none = json.loads(keyguard(third, "import", *database, "--user-column", "org_id").out)
    assert none["skipped"] == 6
    assert none["rows"][0]["reason"] == ("user_id: LookupError: the table has no column 'org_id'")


@pytest.mark.parametrize(
    "args, error",
    [
        pytest.param(
            ["--database", "missing.sqlite3"],
            "keyguard: error: no SQLite database at 'missing.sqlite3'",
            id="missing database",
        ),
        pytest.param(
            ["--database", "DB", "--table", "nope"],
            'keyguard: error: cannot read table "nope" of DB: no such table: nope',
            id="missing table",
        ),
        pytest.param(
            ["--database", "DB", "--user-id", "a", "--user-column", "b"],
            "keyguard: error: argument --user-column: not allowed with argument --user-id"
            " (see 'keyguard import --help')",
            id="two owners",
        ),
    ],
)
def test_cli_import_errors_are_one_line_and_exit_2(
    drf_db: DrfDatabase, tmp_path: Path, args: list[str], error: str
) -> None:
    args = [str(drf_db.path) if arg == "DB" else arg for arg in args]
    ran = keyguard(tmp_path, "import", "--from", "drf-api-key", *args)
    assert ran.code == 2
    assert ran.err.splitlines()[-1] == error.replace("DB", str(drf_db.path))
    assert ran.out == ""


def test_a_scan_of_a_store_of_imported_keys_judges_native_keys(
    drf_db: DrfDatabase, tmp_path: Path
) -> None:
    keyguard(tmp_path, "import", "--from", "drf-api-key", "--database", str(drf_db.path))
    leak = tmp_path / "leak.txt"
    leak.write_text("token = sk_" + "0123456789abcdef" * 2 + "\n")
    ran = keyguard(tmp_path, "scan", str(leak))
    assert (ran.code, ran.out.splitlines()[-1]) == (
        0,
        "Scanned 1 file(s): 1 finding(s): 1 unknown.",
    )
    peppered = keyguard(tmp_path, "scan", str(leak), KEYGUARD_PEPPER=PEPPER)
    assert peppered.code == 2 and "hashed with sha256" in peppered.err
