"""A Hub token reaches the machines that need it without showing where others can read it.

Not on a command line (``ps`` shows those to every user, ``ray job submit`` stores the entrypoint):
``--token`` is refused and ``--token-file`` (a file, or stdin) read instead; not in an actor's
arguments (Ray keeps those in its control store): ``load(token=...)`` hands it to each node's fetcher
through the object store; never in plans, reports or logs. That it arrives is read from the loopback
Hub's own log of each request's Authorization header.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import orchestrator
import orchestrator.fetch_stage
from planning.plan_json import plan_to_json
from workers.sources import SOURCES
from tests import checkpoints
from tests.conftest import wait_until_clean
from tests.hub_server import HubServer
from tests.security_workers import recording_fetcher_class

REPO = "org/gated"
TOKEN = "hf_" + "s3cr3tT0k3n" * 3
MESHLOAD = os.path.join(os.path.dirname(sys.executable), "meshload")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = checkpoints.llama(str(tmp_path_factory.mktemp("gated")), tied=False)
    return path, checkpoints.state_of(path)


@pytest.fixture(scope="module")
def hub(folder):
    with HubServer() as server:
        server.add_repo(REPO, folder[0])
        yield server


def _env(hub, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {**env, "HF_ENDPOINT": hub.url, "MESHLOAD_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}


def test_a_token_on_the_command_line_is_refused(hub, tmp_path):
    hub.reset_log()
    out = subprocess.run([MESHLOAD, "plan", REPO, "--token", TOKEN], env=_env(hub, tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "use --token-file FILE (or - for stdin)" in out.stderr
    assert TOKEN not in out.stdout + out.stderr
    assert hub.served() == []  # refused before anything was asked


def test_the_token_file_or_stdin_is_read_and_sent_to_the_hub_only(hub, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    for args, stdin in ((["--token-file", str(token_file)], None), (["--token-file", "-"], TOKEN + "\n")):
        hub.reset_log()
        out = subprocess.run([MESHLOAD, "plan", REPO, "--tp", "2", "--nodes", "2", "--json", *args],
                             env=_env(hub, tmp_path), input=stdin, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["tp"] == 2
        assert TOKEN not in out.stdout + out.stderr
        api = hub.served(lambda s: s.origin == "hub" and (s.path.startswith(f"/api/models/{REPO}") or "/resolve/" in s.path))
        assert api and all(s.authorization == f"Bearer {TOKEN}" for s in api), [(s.path, s.authorization) for s in api]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = subprocess.run([MESHLOAD, "plan", REPO, "--token-file", str(empty)], env=_env(hub, tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"--token-file {empty} holds no token" in out.stderr


@pytest.mark.cluster
def test_a_load_hands_the_token_to_the_node_fetchers_outside_their_arguments(ray_cluster, hub, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    recording = recording_fetcher_class(orchestrator.fetch_stage._fetcher_class(SOURCES["hub"]))
    monkeypatch.setattr(orchestrator.fetch_stage, "_fetcher_class", lambda source: recording)
    cache = tmp_path / "cache"
    hub.reset_log()
    with orchestrator.load(REPO, tp=2, nodes=2, token=TOKEN, cache_dir=str(cache), fetch="files", progress=False) as m:
        checkpoints.assert_state_equal(m.full_state_dict(), folder[1])
        shown = plan_to_json(m.plan) + repr(m.report) + repr(m.fetch_report) + json.dumps(m.timings)
    assert TOKEN not in shown
    # the nodes' requests for the weights (HEAD of each file at the Hub) carried the token ...
    heads = hub.served(lambda s: s.origin == "hub" and s.method == "HEAD" and "/resolve/" in s.path)
    assert heads and all(s.authorization == f"Bearer {TOKEN}" for s in heads)
    # ... which was in no fetcher's constructor arguments
    recorded = [p for p in cache.iterdir() if p.name.startswith("constructor-args-")]
    assert len(recorded) == 2
    assert all(TOKEN not in p.read_text() and "'token'" not in p.read_text() for p in recorded)
    assert wait_until_clean() == ([], [])
