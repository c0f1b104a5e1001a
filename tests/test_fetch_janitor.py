"""The fetch janitor: what a fetcher killed mid-fetch was writing is removed as soon as it dies, and
nothing else — not after a fetch that ended, not a file another process is fetching, not a part file
whose manifest vouches for its bytes. The "fetcher" here is a real process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from filelock import FileLock

CHILD = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from workers.fetch_janitor import Janitor
j = Janitor()
j.watch_download(blobs_dir={blobs!r}, sha256="abc", lock={blob_lock!r})
j.watch_part(data={part!r}, manifest={part!r} + ".manifest", lock={part_lock!r})
j.watch_part(data={vouched!r}, manifest={vouched!r} + ".manifest", lock={vouched_lock!r})
if {finish!r}:
    j.close()
print("watching", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _leftovers(tmp_path) -> dict[str, str]:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    files = {
        "download": str(blobs / "abc.1234abcd.incomplete"),  # huggingface_hub's temporary download
        "other": str(blobs / "abd.1234abcd.incomplete"),  # another blob's: not watched
        "part": str(tmp_path / "a.safetensors.part"),  # no manifest: nothing vouched for
        "vouched": str(tmp_path / "b.safetensors.part"),
    }
    for path in files.values():
        with open(path, "wb") as f:
            f.write(b"half")
    with open(files["vouched"] + ".manifest", "w") as f:
        f.write("{}")
    return files


def _run_fetcher(tmp_path, files, *, finish: bool) -> None:
    locks = {k: str(tmp_path / f"{k}.lock") for k in ("blob", "part", "vouched")}
    script = CHILD.format(
        root=os.getcwd(), blobs=str(tmp_path / "blobs"), blob_lock=locks["blob"], part=files["part"], part_lock=locks["part"],
        vouched=files["vouched"], vouched_lock=locks["vouched"], finish=finish,
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "watching" in proc.stdout, proc.stderr


def _wait_gone(path: str, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_killed_fetchers_half_written_files_are_removed(tmp_path):
    files = _leftovers(tmp_path)
    _run_fetcher(tmp_path, files, finish=False)
    assert _wait_gone(files["download"]) and _wait_gone(files["part"])
    assert os.path.exists(files["other"]) and os.path.exists(files["vouched"])


def test_nothing_is_removed_after_a_fetch_that_ended(tmp_path):
    files = _leftovers(tmp_path)
    _run_fetcher(tmp_path, files, finish=True)
    time.sleep(1.0)
    assert all(os.path.exists(p) for p in files.values())


def test_a_file_another_process_is_fetching_is_left_alone(tmp_path):
    files = _leftovers(tmp_path)
    with FileLock(str(tmp_path / "blob.lock")), FileLock(str(tmp_path / "part.lock")):
        _run_fetcher(tmp_path, files, finish=False)
        time.sleep(1.0)
        assert os.path.exists(files["download"]) and os.path.exists(files["part"])
