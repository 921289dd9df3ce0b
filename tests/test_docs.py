"""Every snippet in README.md and docs/ runs, so no page can drift from the code.

A page's fenced blocks are checked in order:

- ``python`` blocks run in one namespace per page, in a fresh folder with no
  ``KEYGUARD_*`` variables (so ``APIKeyManager.from_url()`` opens ``./keyguard.db`` there).
  A block preceded by ``<!-- test: needs redis postgres -->`` runs only where those servers
  answer (skip elsewhere, fail in CI, as for the store tests).
- ``console`` blocks are shell: every ``$ keyguard …`` line must parse with the real CLI
  parser, every ``$ make X`` name a Makefile target, every ``python FILE`` name a file of
  the repository. A block preceded by ``<!-- test: run -->`` is also executed, line by
  line, by bash in a fresh folder with this venv's ``keyguard`` first on ``PATH``; each
  command must succeed. A block marked ``<!-- test: output -->`` right after it must be
  exactly what those commands print on stdout.
- ``yaml`` blocks must parse.

Other languages (``text``) are not code. The site itself is built by ``make docs-check``.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from keyguard import APIKeyManager
from keyguard.cli._parser import build_parser
from tests.stores.services import require_postgres, require_redis

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- test: (?P<marker>[^>]*?) -->\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
CHECKED = {"python", "console", "yaml", "text"}
PROGRAMS = {
    "keyguard",
    "make",
    "python",
    "pytest",
    "curl",
    "uvicorn",
    "gunicorn",
    "pip",
    "echo",
    ".",
}
ASSIGNMENT = re.compile(r"[A-Z_]+=")


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    lang: str
    code: str
    marker: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets(page: Path) -> Iterator[Snippet]:
    text = page.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("lang")) + 1
        yield Snippet(page, line, match["lang"], match["code"], match["marker"] or "")


def commands(snippet: Snippet) -> Iterator[str]:
    """The commands of a console block: its ``$ `` lines, without trailing comments."""
    for line in snippet.code.splitlines():
        if line.startswith("$ "):
            yield line[2:]


def words(command: str) -> list[str]:
    """The words of ``command``, without leading ``NAME=value`` words or redirections."""
    argv = shlex.split(command, comments=True)
    while argv and ASSIGNMENT.match(argv[0]):
        argv.pop(0)
    redirects = [i for i, word in enumerate(argv) if word in {">", ">>", "2>", "<"}]
    return argv[: redirects[0]] if redirects else argv


def parses(argv: list[str]) -> bool:
    """Whether the real CLI parser takes ``argv`` (``--help`` and ``--version`` included)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code == 0
    return True


@pytest.fixture
def fresh_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("KEYGUARD_")]:
        if name != "KEYGUARD_REQUIRE_SERVICES":
            monkeypatch.delenv(name)
    return tmp_path


def needs(marker: str) -> None:
    """Skip (or fail in CI) a block whose marker names a server that does not answer."""
    if not marker.startswith("needs "):
        return
    for service in marker.split()[1:]:
        {"redis": require_redis, "postgres": require_postgres}[service]()


def test_pages_are_found() -> None:
    assert len(PAGES) > 10
    for page in PAGES:
        for snippet in snippets(page):
            assert snippet.lang in CHECKED, f"{snippet.where}: no check for {snippet.lang!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_snippets_run(page: Path, fresh_folder: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"snippets_of_{page.stem}"}
    for snippet in snippets(page):
        if snippet.lang != "python":
            continue
        needs(snippet.marker)
        code = compile(snippet.code, snippet.where, "exec")
        exec(code, namespace)
    for value in namespace.values():
        if isinstance(value, APIKeyManager):
            value.close()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_commands_are_real(page: Path) -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    for snippet in snippets(page):
        if snippet.lang != "console":
            continue
        for command in commands(snippet):
            argv = words(command.split("|")[-1] if command.startswith("echo") else command)
            program = argv[0] if argv[0] == "." else Path(argv[0]).name
            assert program in PROGRAMS, f"{snippet.where}: unchecked program in {command!r}"
            if program == "keyguard":
                assert parses(argv[1:]), f"{snippet.where}: {command!r}"
            elif program == "make":
                assert set(argv[1:]) <= targets, f"{snippet.where}: {command!r}"
            elif program == "python" and argv[1] not in ("-m", "-c"):
                assert (ROOT / argv[1]).is_file(), f"{snippet.where}: {command!r}"


def sessions() -> Iterator[tuple[Snippet, Snippet | None]]:
    """Each console block marked ``run``, with the ``output`` block that follows it, if any."""
    for page in PAGES:
        for snippet, after in itertools.pairwise([*snippets(page), None]):
            assert snippet is not None
            if snippet.lang == "console" and snippet.marker == "run":
                yield snippet, after if after is not None and after.marker == "output" else None


@pytest.mark.parametrize("snippet, output", list(sessions()), ids=lambda s: s and s.where)
def test_marked_shell_sessions_run(
    snippet: Snippet, output: Snippet | None, fresh_folder: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGUARD_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    script = "set -euo pipefail\n" + "\n".join(commands(snippet))
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=fresh_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{snippet.where}:\n{done.stdout}\n{done.stderr}"
    if output is not None:
        assert done.stdout == output.code, f"{output.where} is not what the commands print"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_snippets_parse(page: Path) -> None:
    for snippet in snippets(page):
        if snippet.lang == "yaml":
            assert yaml.safe_load(snippet.code) is not None, snippet.where
