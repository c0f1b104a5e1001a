"""A picture of a ``LoadPlan`` as SVG: nodes × ranks, each rank's bytes by layer, tie sends, files fetched.

Why it exists: ``meshload plan`` prints totals and a row per rank, and ``--json`` prints every byte
range, but neither shows at a glance what a person sizing a cluster asks first — which ranks are
heavier and why (the embedding on the first stage, the head on the last), which tied tensors cross
stages (and so cross nodes) after loading, and which files each node fetches at all, and how much of
each. The picture answers those in one look:

- one column per node (header: its ranks and the bytes and files it fetches), one box per rank
  (stage, TP rank, layers; a bar of its parameter bytes split by layer / module, on one scale for all
  ranks, so imbalance is visible; tie lines: what it sends, receives or aliases);
- an arrow per tie send (``RankPlan.sends``) from the owner rank to the receiving rank;
- per node, each file it fetches with the byte ranges drawn along the file's extent.

Hand-written SVG (string building, no plotting dependency), every text escaped, deterministic: the
same plan gives the same bytes, so a checked-in picture (``docs/plan.svg``) diffs cleanly. Hover
titles (``<title>``) carry the exact byte counts.

Pure; runs on the driver (``meshload plan MODEL ... --svg FILE``). Never imports ray.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from planning.plan import FileFetch, LoadPlan, NodePlan, RankPlan
from planning.summary import human_bytes

# Layer index in a parameter name: Llama/Mistral "model.layers.3.", GPT-2 "transformer.h.3.",
# BERT "encoder.layer.3.", others "blocks.3.".
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# Layout, in SVG user units (px).
_MARGIN = 20
_NODE_W = 400
_NODE_GAP = 110  # room for tie arrows between node columns
_PAD = 10
_LINE = 15
_BAR_H = 16
_RANK_GAP = 10
_FILE_ROW = 30
_MAX_TIE_LINES = 4
_MAX_FILES_SHOWN = 40
_MONO_CHAR_W = 6.6  # approx. width of one character of the 11px monospace font
_HEADING_CHAR_W = {"h1": 9.0, "h2": 7.8, "h3": 6.8}  # bold sans-serif headings, generous
_MIN_WIDTH = 640

_EMBEDDING_HINTS = ("embed", "wte", "wpe")
_HEAD_HINTS = ("head", "classifier", "score", "qa_outputs", "pooler")

_COLORS = {
    "layer_even": "#4c78a8",
    "layer_odd": "#9ecae9",
    "embedding": "#54a24b",
    "head": "#f58518",
    "other": "#bab0ac",
    "received": "#ffffff",
}
_LEGEND = (
    ("layer_even", "decoder layer (alternating shades)"),
    ("embedding", "embedding"),
    ("head", "output head"),
    ("other", "other (norms, buffers)"),
    ("received", "received from another stage (tie, not read)"),
)


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes of one layer or module on one rank: one stretch of the rank's bar."""

    label: str  # "layer 3", "model.embed_tokens", "lm_head (from rank 0)"
    kind: str  # a key of _COLORS
    nbytes: int
    num_tensors: int


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _kind_of_module(module: str) -> str:
    parts = module.lower().split(".")
    if any(hint in part for part in parts for hint in _EMBEDDING_HINTS):
        return "embedding"
    if any(hint in part for part in parts for hint in _HEAD_HINTS):
        return "head"
    return "other"


def rank_segments(rank: RankPlan) -> tuple[Segment, ...]:
    """The rank's parameter bytes split by layer (``layer N``) or, outside layers, by module.

    Tensors that alias another of the rank's tensors own no storage and are left out, so the
    segments add up to ``rank.param_bytes``. Tensors received from another stage are their own
    segments (kind ``received``). Order: first appearance in the rank's (model-ordered) parameters.
    """
    order: list[tuple[str, str]] = []
    totals: dict[tuple[str, str], list[int]] = {}
    for p in rank.params:
        if not p.owns_storage:
            continue
        m = _LAYER.search(p.name)
        if p.receive_from is not None:
            key = (f"{_module_of(p.name)} (from rank {p.receive_from})", "received")
        elif m:
            index = int(m.group(1))
            key = (f"layer {index}", "layer_even" if index % 2 == 0 else "layer_odd")
        else:
            module = _module_of(p.name)
            key = (module, _kind_of_module(module))
        if key not in totals:
            totals[key] = [0, 0]
            order.append(key)
        totals[key][0] += p.nbytes
        totals[key][1] += 1
    return tuple(Segment(label=k[0], kind=k[1], nbytes=totals[k][0], num_tensors=totals[k][1]) for k in order)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fit(text: str, width_px: float, *, char_w: float = _MONO_CHAR_W) -> str:
    """Shorten ``text`` in the middle so it fits ``width_px`` (``char_w``: estimated width of one character)."""
    max_chars = max(int(width_px / char_w), 5)
    if len(text) <= max_chars:
        return text
    keep = max_chars - 1
    return text[: keep - keep // 2] + "…" + text[len(text) - keep // 2 :]


def _text(x: float, y: float, text: str, *, cls: str = "t", anchor: str | None = None, width_px: float | None = None) -> str:
    shown = _fit(text, width_px, char_w=_HEADING_CHAR_W.get(cls, _MONO_CHAR_W)) if width_px is not None else text
    anchor_attr = f' text-anchor="{anchor}"' if anchor else ""
    title = f"<title>{_esc(text)}</title>" if shown != text else ""
    return f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}"{anchor_attr}>{title}{_esc(shown)}</text>'


def _layers_of(plan: LoadPlan, rank: RankPlan) -> str:
    stage = plan.stages[rank.stage]
    if stage.layer_stop <= stage.layer_start:
        return "no layers"
    if stage.layer_stop - stage.layer_start == 1:
        return f"layer {stage.layer_start}"
    return f"layers {stage.layer_start}-{stage.layer_stop - 1}"


def _tie_lines(rank: RankPlan) -> list[str]:
    lines = [f"sends {s.name} → rank {s.to_rank}" for s in rank.sends]
    lines += [f"receives {p.name} ← rank {p.receive_from}" for p in rank.params if p.receive_from is not None]
    lines += [f"tied: {p.name} = {p.alias_of}" for p in rank.params if p.alias_of is not None]
    if len(lines) > _MAX_TIE_LINES:
        lines = lines[: _MAX_TIE_LINES - 1] + [f"… and {len(lines) - _MAX_TIE_LINES + 1} more tie(s)"]
    return lines


def _rank_height(rank: RankPlan) -> float:
    return _PAD + _LINE + 4 + _BAR_H + 4 + _LINE * (1 + len(_tie_lines(rank))) + _PAD


def _ranges_text(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges)


def plan_svg(plan: LoadPlan, *, title: str | None = None) -> str:
    """The SVG text of the plan's picture (see module docstring). Deterministic for a given plan."""
    scale_bytes = max([r.param_bytes for r in plan.ranks] + [b for b in plan.budgets if b is not None] + [1])
    heading = title or (
        f"{plan.model.class_name} from {plan.model.source} — tp={plan.tp} pp={plan.pp} nodes={plan.num_nodes}, "
        f"{plan.world_size} ranks, {plan.dtype} on {plan.device}"
    )
    sub = (
        f"{human_bytes(plan.totals.param_bytes)} of parameters; checkpoint {human_bytes(plan.totals.checkpoint_bytes)} "
        f"in {len(plan.files)} file(s); bars share one scale (longest = {human_bytes(scale_bytes)})"
    )
    top = _MARGIN + 48
    columns: list[str] = []
    box_of: dict[int, tuple[float, float, float, float]] = {}  # rank -> x, y, w, h
    column_bottom = top
    for col, node in enumerate(plan.nodes):
        svg, bottom = _node_column(
            plan, node, x=_MARGIN + col * (_NODE_W + _NODE_GAP), top=top, scale_bytes=scale_bytes, box_of=box_of
        )
        columns.append(svg)
        column_bottom = max(column_bottom, bottom)

    legend_y = column_bottom + 24
    width = _MARGIN * 2 + len(plan.nodes) * _NODE_W + (len(plan.nodes) - 1) * _NODE_GAP
    same_node_tie = any(plan.ranks[s.to_rank].node == r.node for r in plan.ranks for s in r.sends)
    width = max(width + (60 if same_node_tie else 0), _MIN_WIDTH)  # room for the loop right of a column
    height = legend_y + len(_LEGEND) * _LINE + _MARGIN
    return "\n".join(
        [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
            f'viewBox="0 0 {width} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
            f"<title>{_esc(heading)}</title>",
            _STYLE,
            _DEFS,
            f'<rect x="0" y="0" width="{width}" height="{height:.0f}" fill="#ffffff"/>',
            _text(_MARGIN, _MARGIN + 12, heading, cls="h1", width_px=width - 2 * _MARGIN),
            _text(_MARGIN, _MARGIN + 30, sub, width_px=width - 2 * _MARGIN),
            *columns,
            *_tie_arrows(plan, box_of),
            _legend(_MARGIN, legend_y),
            "</svg>",
            "",
        ]
    )


def _node_column(
    plan: LoadPlan,
    node: NodePlan,
    *,
    x: float,
    top: float,
    scale_bytes: int,
    box_of: dict[int, tuple[float, float, float, float]],
) -> tuple[str, float]:
    """One node: header, a box per rank (recorded in ``box_of`` for the arrows), the files it fetches.

    Returns the column's SVG and its bottom y.
    """
    inner_w = _NODE_W - 2 * _PAD
    file_size = {f.name: f.size for f in plan.files}
    ranks = [plan.ranks[r] for r in node.ranks]
    header = f"node {node.node} · ranks {', '.join(map(str, node.ranks))}"
    fetch_line = f"fetches {human_bytes(node.fetch_bytes)} from {len(node.fetch)} of {len(plan.files)} file(s)"
    y = top + _PAD + _LINE
    parts = [
        _text(x + _PAD, y, header, cls="h2", width_px=inner_w),
        _text(x + _PAD, y + _LINE, fetch_line, width_px=inner_w),
    ]
    y += _LINE + 8
    for r in ranks:
        h = _rank_height(r)
        box_of[r.rank] = (x + _PAD, y, inner_w, h)
        parts.append(_rank_box(plan, r, x=x + _PAD, y=y, w=inner_w, h=h, scale_bytes=scale_bytes))
        y += h + _RANK_GAP
    parts.append(_text(x + _PAD, y + _LINE - 4, "files fetched (byte ranges along each file)", cls="h3"))
    y += _LINE
    shown = node.fetch[:_MAX_FILES_SHOWN]
    for f in shown:
        parts.append(_file_row(f, size=file_size.get(f.file, f.nbytes), x=x + _PAD, y=y, w=inner_w))
        y += _FILE_ROW
    if len(node.fetch) > len(shown):
        parts.append(_text(x + _PAD, y + _LINE - 4, f"… and {len(node.fetch) - len(shown)} more file(s)"))
        y += _LINE
    if not node.fetch:
        parts.append(_text(x + _PAD, y + _LINE - 4, "(nothing: every tensor arrives from another stage)"))
        y += _LINE
    y += _PAD
    node_rect = (
        f'<rect class="node" data-node="{node.node}" x="{x}" y="{top}" width="{_NODE_W}" height="{y - top:.1f}" rx="8">'
        f"<title>{_esc(header)}; {_esc(fetch_line)}</title></rect>"
    )
    return f'<g class="node-column" data-node="{node.node}">{node_rect}{"".join(parts)}</g>', y


_STYLE = """<style>
.node { fill: #f7f7f7; stroke: #555555; stroke-width: 1.2; }
.rank { fill: #ffffff; stroke: #333333; stroke-width: 1; }
.seg { stroke: #ffffff; stroke-width: 0.5; }
.seg.received { fill: #ffffff; stroke: #f58518; stroke-width: 1.2; stroke-dasharray: 3 2; }
.track { fill: #eeeeee; }
.range { fill: #4c78a8; }
.budget { stroke: #d62728; stroke-width: 1.5; stroke-dasharray: 4 2; }
.tie { fill: none; stroke: #d62728; stroke-width: 1.6; }
text { font-size: 11px; fill: #222222; font-family: ui-monospace, Menlo, Consolas, monospace; }
text.h1 { font-size: 15px; font-weight: bold; font-family: Helvetica, Arial, sans-serif; }
text.h2 { font-size: 13px; font-weight: bold; font-family: Helvetica, Arial, sans-serif; }
text.h3 { font-size: 11px; font-weight: bold; font-family: Helvetica, Arial, sans-serif; }
text.tie-label { fill: #d62728; font-weight: bold; }
</style>"""

_DEFS = (
    '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
    'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#d62728"/></marker></defs>'
)


def _rank_box(plan: LoadPlan, rank: RankPlan, *, x: float, y: float, w: float, h: float, scale_bytes: int) -> str:
    inner = w - 2 * _PAD
    head = f"rank {rank.rank} · stage {rank.stage} · tp {rank.tp_rank} · {_layers_of(plan, rank)}"
    out = [
        f'<g class="rank-box" data-rank="{rank.rank}" data-node="{rank.node}" data-stage="{rank.stage}">',
        f'<rect class="rank" data-rank="{rank.rank}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="4">'
        f"<title>{_esc(head)}: {rank.param_bytes} bytes of parameters, {rank.read_bytes} bytes read</title></rect>",
        _text(x + _PAD, y + _PAD + 11, head, cls="h3", width_px=inner),
    ]
    bar_y = y + _PAD + _LINE + 4
    out.append(f'<rect class="track" x="{x + _PAD:.1f}" y="{bar_y:.1f}" width="{inner:.1f}" height="{_BAR_H}"/>')
    cursor = x + _PAD
    for seg in rank_segments(rank):
        seg_w = inner * seg.nbytes / scale_bytes
        fill = _COLORS[seg.kind]
        out.append(
            f'<rect class="seg {seg.kind}" x="{cursor:.2f}" y="{bar_y:.1f}" width="{seg_w:.2f}" height="{_BAR_H}" '
            f'fill="{fill}"><title>{_esc(seg.label)}: {human_bytes(seg.nbytes)} ({seg.nbytes} bytes, '
            f"{seg.num_tensors} tensor(s))</title></rect>"
        )
        cursor += seg_w
    budget = plan.budgets[rank.rank] if rank.rank < len(plan.budgets) else None
    if budget is not None:
        bx = x + _PAD + inner * budget / scale_bytes
        out.append(
            f'<line class="budget" x1="{bx:.1f}" y1="{bar_y - 3:.1f}" x2="{bx:.1f}" y2="{bar_y + _BAR_H + 3:.1f}">'
            f"<title>max_memory {human_bytes(budget)}</title></line>"
        )
    ty = bar_y + _BAR_H + 4 + 11
    stats = (
        f"params {human_bytes(rank.param_bytes)} · reads {human_bytes(rank.read_bytes)} "
        f"from {len(rank.files)} file(s)"
    )
    out.append(_text(x + _PAD, ty, stats, width_px=inner))
    for line in _tie_lines(rank):
        ty += _LINE
        out.append(_text(x + _PAD, ty, line, cls="tie-line", width_px=inner))
    out.append("</g>")
    return "".join(out)


def _file_row(fetch: FileFetch, *, size: int, x: float, y: float, w: float) -> str:
    label = f"{fetch.file}: {human_bytes(fetch.nbytes)} of {human_bytes(size)}"
    out = [
        f'<g class="file" data-file="{_esc(fetch.file)}">',
        _text(x, y + 11, label, width_px=w),
        f'<rect class="track" x="{x:.1f}" y="{y + 15:.1f}" width="{w:.1f}" height="8"/>',
    ]
    for a, b in fetch.ranges:
        rx = x + w * a / max(size, 1)
        rw = max(w * (b - a) / max(size, 1), 0.8)
        out.append(
            f'<rect class="range" x="{rx:.2f}" y="{y + 15:.1f}" width="{rw:.2f}" height="8">'
            f"<title>{_esc(fetch.file)} bytes [{a}, {b})</title></rect>"
        )
    out.append(f"<title>{_esc(fetch.file)}: {len(fetch.ranges)} range(s): {_esc(_ranges_text(fetch.ranges[:8]))}"
               f"{' …' if len(fetch.ranges) > 8 else ''}</title>")
    out.append("</g>")
    return "".join(out)


def _tie_arrows(plan: LoadPlan, box_of: dict[int, tuple[float, float, float, float]]) -> list[str]:
    """One arrow per tie send, owner rank → receiving rank, labelled ``tie``."""
    out = []
    for rank in plan.ranks:
        for send in rank.sends:
            sx, sy, sw, sh = box_of[rank.rank]
            dx, dy, dw, dh = box_of[send.to_rank]
            y1, y2 = sy + sh / 2, dy + dh / 2
            if dx > sx:  # receiver in a column to the right
                x1, x2 = sx + sw, dx
                bend = (x2 - x1) / 2
                path = f"M {x1:.1f} {y1:.1f} C {x1 + bend:.1f} {y1:.1f} {x2 - bend:.1f} {y2:.1f} {x2:.1f} {y2:.1f}"
                lx, ly = x1 + _PAD + 24, y1 - 5  # in the gap next to the sender: never over another column
            elif dx < sx:  # receiver in a column to the left
                x1, x2 = sx, dx + dw
                bend = (x1 - x2) / 2
                path = f"M {x1:.1f} {y1:.1f} C {x1 - bend:.1f} {y1:.1f} {x2 + bend:.1f} {y2:.1f} {x2:.1f} {y2:.1f}"
                lx, ly = x1 - _PAD - 24, y1 - 5
            else:  # same node: loop out to the right of the column
                x1 = x2 = sx + sw
                out_x = x1 + _PAD + 40
                path = f"M {x1:.1f} {y1:.1f} C {out_x:.1f} {y1:.1f} {out_x:.1f} {y2:.1f} {x2:.1f} {y2:.1f}"
                lx, ly = out_x - 8, (y1 + y2) / 2
            what = f"tie: rank {rank.rank} sends {send.name} to rank {send.to_rank} as {send.as_name}"
            out.append(
                f'<g class="tie-send" data-from="{rank.rank}" data-to="{send.to_rank}">'
                f'<path class="tie" d="{path}" marker-end="url(#arrow)"><title>{_esc(what)}</title></path>'
                f'<text class="tie-label" x="{lx:.1f}" y="{ly:.1f}" text-anchor="middle">tie</text></g>'
            )
    return out


def _legend(x: float, y: float) -> str:
    """One line per colour, then the tie arrow; ``y`` is the first line's baseline."""
    out = ['<g class="legend">']
    for i, (kind, label) in enumerate(_LEGEND):
        ly = y + i * _LINE
        extra = ' stroke="#f58518" stroke-dasharray="3 2"' if kind == "received" else ""
        out.append(f'<rect x="{x:.1f}" y="{ly - 9:.1f}" width="26" height="10" fill="{_COLORS[kind]}"{extra}/>')
        out.append(_text(x + 34, ly, label))
    ly = y + len(_LEGEND) * _LINE
    out.append(f'<path class="tie" d="M {x:.1f} {ly - 4:.1f} L {x + 26:.1f} {ly - 4:.1f}" marker-end="url(#arrow)"/>')
    out.append(_text(x + 34, ly, "tie send: the owner stage reads a tied tensor once, then sends it to this rank"))
    out.append("</g>")
    return "".join(out)
