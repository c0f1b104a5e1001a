"""``planning/`` is pure: it takes data and returns data; it opens no socket and writes no file.

Where I/O lives (the project's design rule, README's stage table): a source's I/O lives under ``workers/sources/``, the plan cache under
``orchestrator/``. This walks the syntax tree of every module of ``planning/`` (no import, so nothing
runs) and fails on a network or locking import, a huggingface_hub name that talks to the Hub, an
``open``/``os.open`` that writes, or a call that writes, moves or removes files. Reading the bytes it
parses (a header, a JSON index) stays allowed.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PLANNING = pathlib.Path(__file__).resolve().parent.parent / "planning"

NETWORK_OR_LOCKS = {
    "socket", "ssl", "http", "urllib", "urllib3", "requests", "httpx", "httpx2", "aiohttp", "fcntl", "filelock",
    "tempfile", "shutil", "subprocess", "ray",
}
HUB_PURE_NAMES = {"validate_repo_id", "HFValidationError"}  # what planning may take from huggingface_hub
OS_WRITING_CALLS = {  # os.<name>(...)
    "write", "pwrite", "pwritev", "fsync", "fdatasync", "replace", "rename", "renames", "unlink", "remove", "rmdir",
    "removedirs", "makedirs", "mkdir", "chmod", "chown", "symlink", "link", "truncate", "ftruncate", "utime",
    "mkfifo", "mknod",
}
PATH_WRITING_CALLS = {  # <pathlib.Path>.<name>(...): names no str, list or dict method shares
    "write_text", "write_bytes", "touch", "mkdir", "unlink", "rmdir", "symlink_to", "hardlink_to", "chmod",
}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"}


def _mode(call: ast.Call, position: int) -> str | None:
    if len(call.args) > position and isinstance(call.args[position], ast.Constant):
        return call.args[position].value
    for kw in call.keywords:
        if kw.arg == "mode" and isinstance(kw.value, ast.Constant):
            return kw.value.value
    if len(call.args) > position or any(kw.arg == "mode" for kw in call.keywords):
        return "?"  # a mode that is not a literal: cannot be shown to be read-only
    return None


def impurities(source: str, *, name: str) -> list[str]:
    """What in the module text ``source`` opens a socket, takes a lock or writes a file (``name``:line)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in NETWORK_OR_LOCKS or top == "huggingface_hub":
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top in NETWORK_OR_LOCKS:
                found.append(f"{where}: from {node.module} import ...")
            elif top == "huggingface_hub":
                found += [f"{where}: from {node.module} import {a.name}" for a in node.names if a.name not in HUB_PURE_NAMES]
        elif isinstance(node, ast.Call):
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if attr == "open" and isinstance(func, ast.Name):  # builtins.open(file, mode)
                mode = _mode(node, 1)
                if mode is not None and (mode == "?" or set(mode) & set("wax+")):
                    found.append(f"{where}: open(..., {mode!r})")
            elif attr == "open" and isinstance(func, ast.Attribute):  # os.open(path, flags) / Path.open(mode)
                flags = {n.attr for arg in node.args[1:2] for n in ast.walk(arg) if isinstance(n, ast.Attribute)}
                mode = _mode(node, 0) if not (isinstance(func.value, ast.Name) and func.value.id == "os") else None
                if flags & WRITE_FLAGS or (mode is not None and (mode == "?" or set(str(mode)) & set("wax+"))):
                    found.append(f"{where}: {ast.unparse(func)}(...) for writing")
            elif isinstance(func, ast.Attribute):
                on_os = isinstance(func.value, ast.Name) and func.value.id == "os"
                if (on_os and attr in OS_WRITING_CALLS) or (not on_os and attr in PATH_WRITING_CALLS):
                    found.append(f"{where}: {ast.unparse(func)}(...)")
    return found


@pytest.mark.parametrize("module", sorted(p.name for p in PLANNING.glob("*.py")))
def test_planning_modules_open_no_socket_and_write_no_file(module):
    path = PLANNING / module
    assert impurities(path.read_text(encoding="utf-8"), name=f"planning/{module}") == []


@pytest.mark.parametrize("snippet, what", [
    ("import httpx", "import httpx"),
    ("from huggingface_hub import hf_hub_download", "hf_hub_download"),
    ("from huggingface_hub.utils import get_session", "get_session"),
    ("import fcntl", "import fcntl"),
    ("from filelock import FileLock", "filelock"),
    ("import socket", "import socket"),
    ("from urllib.request import urlopen", "urllib.request"),
    ("open(p, 'wb')", "open(..., 'wb')"),
    ("open(p, mode='a')", "open(..., 'a')"),
    ("open(p, m)", "open(..., '?')"),
    ("os.open(p, os.O_WRONLY | os.O_CREAT)", "os.open(...) for writing"),
    ("os.replace(a, b)", "os.replace(...)"),
    ("os.fsync(fd)", "os.fsync(...)"),
    ("pathlib.Path(p).write_text('x')", "write_text(...)"),
])
def test_the_checker_catches_each_kind_of_io(snippet, what):
    """Each kind of I/O the rule forbids is reported (the check above cannot pass by seeing nothing) ..."""
    found = impurities(snippet, name="m")
    assert len(found) == 1 and what in found[0], found


def test_the_checker_allows_what_planning_does():
    """... and what planning legitimately does is not: read bytes, validate a repo id."""
    allowed = (
        "from huggingface_hub.utils import validate_repo_id\n"
        "with open(p, 'rb') as f: f.read(8)\n"
        "open(p, encoding='utf-8')\n"
        "os.open(p, os.O_RDONLY)\n"
        "json.loads(s)\n"
        "handlers.remove(h); name.replace('.', '/')\n"
    )
    assert impurities(allowed, name="m") == []
