"""The plan picture (``planning.plan_picture``, ``meshload plan --svg``): valid SVG that shows the plan.

Unit tests: plans in one process from tiny checkpoints in ``tmp_path``, no Ray. The SVG is parsed with
``xml.etree`` and its structure (rank boxes, node columns, files, tie arrows) compared with the plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from orchestrator.cli import write_picture
from planning.plan_picture import plan_svg, rank_segments
from orchestrator import plan as make_plan
from tests import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("tied")), tied=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return checkpoints.llama(str(tmp_path_factory.mktemp("untied")), tied=False)


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg.encode("utf-8"))  # bytes: the text carries an encoding declaration
    assert root.tag == f"{SVG}svg"
    return root


def _groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == cls]


def _texts(elem: ET.Element) -> list[str]:
    """Every text element's full text (the hover title when the shown text was shortened)."""
    out = []
    for t in elem.iter(f"{SVG}text"):
        title = t.find(f"{SVG}title")
        out.append(title.text if title is not None else "".join(t.itertext()))
    return out


def test_tied_pp2_picture_shows_nodes_ranks_files_and_tie_sends(tied):
    plan = make_plan(tied, tp=2, pp=2, nodes=2)
    root = _parse(plan_svg(plan))

    boxes = _groups(root, "rank-box")
    assert sorted(int(b.get("data-rank")) for b in boxes) == [0, 1, 2, 3]
    assert {int(b.get("data-rank")): int(b.get("data-node")) for b in boxes} == {0: 0, 1: 0, 2: 1, 3: 1}
    assert len([r for r in root.iter(f"{SVG}rect") if r.get("class") == "rank"]) == 4

    columns = {int(g.get("data-node")): g for g in _groups(root, "node-column")}
    assert sorted(columns) == [0, 1]
    for node in plan.nodes:
        texts = _texts(columns[node.node])
        assert f"node {node.node} · ranks {', '.join(map(str, node.ranks))}" in texts
        # Each column lists exactly the files its node fetches, and each name is written out.
        shown = {g.get("data-file") for g in _groups(columns[node.node], "file")}
        assert shown == {f.file for f in node.fetch} and shown
        for name in shown:
            assert any(t.startswith(f"{name}: ") for t in texts), name
    # The two nodes fetch disjoint halves of the 6 shards here (stage 0: layers 0-1, stage 1: layer 2).
    assert not ({f.file for f in plan.nodes[0].fetch} & {f.file for f in plan.nodes[1].fetch})

    sends = _groups(root, "tie-send")
    assert sorted((int(g.get("data-from")), int(g.get("data-to"))) for g in sends) == [(0, 2), (1, 3)]
    for g in sends:
        assert [t.text for t in g.iter(f"{SVG}text")] == ["tie"]
        path = next(g.iter(f"{SVG}path"))
        assert path.get("marker-end") == "url(#arrow)"
        assert "sends model.embed_tokens.weight to rank" in path.find(f"{SVG}title").text
    rank2 = _texts(next(b for b in boxes if b.get("data-rank") == "2"))
    assert "receives lm_head.weight ← rank 0" in rank2
    rank0 = _texts(next(b for b in boxes if b.get("data-rank") == "0"))
    assert "sends model.embed_tokens.weight → rank 2" in rank0


def test_no_tie_arrow_without_a_cross_stage_tie(tied, untied):
    untied_pp2 = _parse(plan_svg(make_plan(untied, tp=2, pp=2, nodes=2)))
    assert _groups(untied_pp2, "tie-send") == []
    assert not any(t.startswith(("sends ", "receives ", "tied: ")) for t in _texts(untied_pp2))

    # Tied, one stage: the head aliases the embedding on each rank; nothing is sent.
    tied_pp1 = _parse(plan_svg(make_plan(tied, tp=2, pp=1, nodes=2)))
    assert _groups(tied_pp1, "tie-send") == []
    for box in _groups(tied_pp1, "rank-box"):
        assert "tied: lm_head.weight = model.embed_tokens.weight" in _texts(box)


@pytest.mark.parametrize("tp, pp, nodes", [(1, 1, 1), (2, 2, 2), (4, 1, 2), (1, 3, 3), (2, 2, 1)])
def test_segments_add_up_to_each_ranks_parameter_bytes(tied, untied, tp, pp, nodes):
    for path in (tied, untied):
        plan = make_plan(path, tp=tp, pp=pp, nodes=nodes)
        for r in plan.ranks:
            segs = rank_segments(r)
            assert sum(s.nbytes for s in segs) == r.param_bytes, (r.rank, segs)
            assert all(s.nbytes > 0 and s.num_tensors > 0 for s in segs)
        root = _parse(plan_svg(plan))
        assert len(_groups(root, "rank-box")) == plan.world_size
        assert len(_groups(root, "node-column")) == nodes
        expected_sends = sorted((r.rank, s.to_rank) for r in plan.ranks for s in r.sends)
        assert sorted((int(g.get("data-from")), int(g.get("data-to"))) for g in _groups(root, "tie-send")) == expected_sends


def test_segments_follow_layers_and_modules(tied):
    plan = make_plan(tied, tp=2, pp=2, nodes=2)
    first = [(s.label, s.kind) for s in rank_segments(plan.ranks[0])]
    assert first == [("model.embed_tokens", "embedding"), ("layer 0", "layer_even"), ("layer 1", "layer_odd")]
    last = [(s.label, s.kind) for s in rank_segments(plan.ranks[3])]
    assert last == [("layer 2", "layer_even"), ("model.norm", "other"), ("lm_head (from rank 1)", "received")]


def test_text_is_escaped(tmp_path, tied):
    import shutil

    odd = tmp_path / 'a&b <c> "d"'
    shutil.copytree(tied, odd)
    plan = make_plan(str(odd), tp=2, pp=2, nodes=2)
    svg = plan_svg(plan)
    root = _parse(svg)
    assert str(odd) in root.find(f"{SVG}title").text
    svg_titled = plan_svg(plan, title="<script>&")
    assert "<script>" not in svg_titled
    assert _parse(svg_titled).find(f"{SVG}title").text == "<script>&"


def test_write_picture_is_deterministic(tmp_path, tied):
    plan = make_plan(tied, tp=2, pp=2, nodes=2)
    a = write_picture(plan, tmp_path / "a.svg")
    b = write_picture(make_plan(tied, tp=2, pp=2, nodes=2), tmp_path / "b.svg")
    assert a == str(tmp_path / "a.svg")
    with open(a, encoding="utf-8") as fa, open(b, encoding="utf-8") as fb:
        assert fa.read() == fb.read()


def test_cli_plan_svg_keeps_json_clean(tmp_path, tied, capsys):
    from orchestrator.cli import main

    out = tmp_path / "plan.svg"
    assert main(["plan", tied, "--tp", "2", "--pp", "2", "--nodes", "2", "--json", "--svg", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tp"] == 2  # stdout is still pure JSON
    assert f"plan picture written to {out}" in captured.err
    root = ET.parse(out).getroot()
    assert len(_groups(root, "rank-box")) == 4 and len(_groups(root, "tie-send")) == 2


def test_checked_in_docs_picture_is_the_tied_tp2_pp2_example():
    root = ET.parse(os.path.join(REPO, "docs", "plan.svg")).getroot()
    assert sorted(int(b.get("data-rank")) for b in _groups(root, "rank-box")) == [0, 1, 2, 3]
    assert len(_groups(root, "node-column")) == 2
    assert sorted((g.get("data-from"), g.get("data-to")) for g in _groups(root, "tie-send")) == [("0", "2"), ("1", "3")]


def test_picture_module_does_not_import_ray(tied):
    code = (
        "import sys\n"
        "from planning.options import PlanOptions\n"
        "from planning.planner import make_plan\n"
        "from planning.plan_picture import plan_svg\n"
        "from workers.sources import resolve_model\n"
        f"plan_svg(make_plan(resolve_model({tied!r}), PlanOptions(tp=2, pp=2, nodes=2)))\n"
        "assert 'ray' not in sys.modules, 'plan_picture imported ray'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
