"""store_from_url: memory and SQLite URLs, the KEYGUARD_STORE default, and clear refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyguard import APIKeyManager, KeyStore, MemoryStore, SQLiteStore, store_from_url


@pytest.fixture(autouse=True)
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in an empty working directory with no KEYGUARD_STORE set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYGUARD_STORE", raising=False)
    yield tmp_path


def opened(url: str | None = None) -> KeyStore:
    store = store_from_url(url)
    store.close()
    return store


@pytest.mark.parametrize("url", ["memory://", "memory:", "memory:///", "MEMORY://", " memory:// "])
def test_memory_url(url: str) -> None:
    assert isinstance(opened(url), MemoryStore)


@pytest.mark.parametrize(
    ("url", "relative_path"),
    [
        pytest.param("sqlite:///relative.db", "relative.db", id="relative"),
        pytest.param("sqlite:///data/keys.db", "data/keys.db", id="relative in a folder"),
        pytest.param("sqlite:///my%20keys.db", "my keys.db", id="percent-encoded"),
        pytest.param("SQLite:///upper.db", "upper.db", id="scheme case"),
    ],
)
def test_sqlite_url_with_a_relative_path(in_empty_dir: Path, url: str, relative_path: str) -> None:
    (in_empty_dir / "data").mkdir()

    store = opened(url)

    assert isinstance(store, SQLiteStore)
    assert store.path == Path(relative_path)
    assert (in_empty_dir / relative_path).is_file()


def test_sqlite_url_with_an_absolute_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = elsewhere / "path.db"

    store = opened(f"sqlite:///{absolute}")

    assert str(absolute).startswith("/")
    assert isinstance(store, SQLiteStore)
    assert store.path == absolute
    assert absolute.is_file()
    assert not (tmp_path / "path.db").exists()


def test_default_is_sqlite_keyguard_db_in_the_working_directory(in_empty_dir: Path) -> None:
    store = opened()

    assert isinstance(store, SQLiteStore)
    assert store.path == Path("keyguard.db")
    assert [p.name for p in in_empty_dir.iterdir()] == ["keyguard.db"]


def test_empty_keyguard_store_means_the_default(
    in_empty_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYGUARD_STORE", "")

    store = opened()

    assert isinstance(store, SQLiteStore)
    assert store.path == Path("keyguard.db")


def test_keyguard_store_env_is_the_default(
    in_empty_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYGUARD_STORE", "memory://")

    assert isinstance(opened(), MemoryStore)
    assert isinstance(APIKeyManager.from_url().store, MemoryStore)
    assert isinstance(opened("sqlite:///explicit.db"), SQLiteStore)
    assert [p.name for p in in_empty_dir.iterdir()] == ["explicit.db"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("mysql://host/db", "unknown store URL scheme", id="unknown scheme"),
        pytest.param("keyguard.db", "unknown store URL scheme", id="bare file name"),
        pytest.param("/var/lib/keys.db", "unknown store URL scheme", id="bare path"),
        pytest.param("", "unknown store URL scheme", id="empty"),
        pytest.param("sqlite:///keys.db?mode=ro", "unknown parameter(s) mode", id="sqlite param"),
        pytest.param("memory://?size=10", "unknown parameter(s) size", id="memory param"),
        pytest.param("sqlite:///keys.db?a", "malformed query string", id="malformed query"),
        pytest.param("sqlite://keys.db", "names a host 'keys.db'", id="two slashes"),
        pytest.param("sqlite://localhost/keys.db", "names a host 'localhost'", id="sqlite host"),
        pytest.param("sqlite://", "needs a file path", id="sqlite without a path"),
        pytest.param("sqlite:///", "needs a file path", id="sqlite with an empty path"),
        pytest.param("memory://somewhere", "takes no host or path", id="memory host"),
        pytest.param("memory:///keys.db", "takes no host or path", id="memory path"),
    ],
)
def test_bad_url_is_refused_clearly(in_empty_dir: Path, url: str, message: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        store_from_url(url)

    assert message in str(exc_info.value)
    assert list(in_empty_dir.iterdir()) == []


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as exc_info:
        store_from_url("mysql://host/db")

    assert "memory://" in str(exc_info.value)
    assert "sqlite://" in str(exc_info.value)


@pytest.mark.parametrize("url", [5, b"memory://", ["memory://"]])
def test_non_string_url_is_a_type_error(url: object) -> None:
    with pytest.raises(TypeError, match="store URL must be a str"):
        store_from_url(url)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("nosuch://admin:hunter2@db.example/keys", id="unknown scheme"),
        pytest.param("sqlite://admin:hunter2@db.example/keys.db", id="sqlite with host"),
        pytest.param("sqlite://admin:hunter2@/keys.db", id="sqlite with userinfo only"),
        pytest.param("memory://admin:hunter2@db.example", id="memory with host"),
        pytest.param("sqlite://admin:hunter2@/keys.db?a", id="malformed query"),
        pytest.param("sqlite:///keys.db?password=hunter2", id="password parameter"),
    ],
)
def test_a_password_is_never_echoed(url: str) -> None:
    with pytest.raises(ValueError) as exc_info:
        store_from_url(url)

    assert "hunter2" not in str(exc_info.value)
    assert "hunter2" not in repr(exc_info.value.__cause__)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("sqlite:rel.db", "three slashes", id="no slashes"),
        pytest.param("sqlite:///a#b.db", "fragment", id="a '#' in the path"),
    ],
)
def test_a_sqlite_url_that_would_open_another_file_is_refused(
    url: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        store_from_url(url)
    assert list(tmp_path.iterdir()) == []
