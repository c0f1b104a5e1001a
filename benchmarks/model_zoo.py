"""The model zoo: every causal-LM architecture transformers ships a TP plan for, loaded by meshload.

For each architecture (transformers' causal-LM auto mapping, the model types whose config declares a
``base_model_tp_plan``, plus the families meshload adds plans for in ``planning.tp_plans``) it builds
a tiny random config from transformers' own config class, writes the model with ``save_pretrained``,
loads it back with transformers' ``from_pretrained`` (the oracle: its state and its logits for a fixed
prompt), then loads it with meshload at ``tp=2`` and at ``pp=2`` over 2 simulated nodes of a local
Ray cluster and compares: state bit for bit, logits within 1e-4. Each load ends in one of:

- ``works``: state bit-exact and logits within tolerance;
- ``refused``: ``orchestrator.plan`` raised a meshload error (plan time, before any placement);
- ``broken``: anything else (an error after placement, a state or logits mismatch).

Architectures whose tiny config transformers itself cannot build or run are listed as ``no
reference`` with transformers' error. Results are kept per architecture in
``docs/results/models.json`` (with the date each ran) and the matrix is rendered from it into
``docs/MODELS.md``::

    python -m benchmarks.model_zoo                      # every architecture (an hour or more on 2 cores)
    python -m benchmarks.model_zoo --only llama,gpt2    # rerun a few: their rows are replaced, the rest kept
    python -m benchmarks.model_zoo --only llama --dry   # print only, write nothing
    python -m benchmarks.model_zoo --resume             # go on with the architectures not run yet

Runs on the driver; starts (and stops) its own 2-node Ray cluster on 127.0.0.12-13, started again if a
node dies. Results are written after every architecture, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

TOPOLOGIES = ((2, 1), (1, 2))  # (tp, pp), each over 2 nodes
ATOL = 1e-4
PROMPT = ((1, 5, 9, 33, 77, 100, 3, 4), (7, 8, 60, 61, 62, 11, 12, 13))

# Sizes every tiny config gets, for whichever of these names its config class has (transformers'
# configs spell the same idea differently; ``attribute_map`` aliases are resolved by the class).
TINY: dict[str, object] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "sliding_window": 16,
    "num_nextn_predict_layers": 0,
    "num_mtp_layers": 0,
    # GPT-2 style spellings
    "n_embd": 64,
    "n_layer": 4,
    "n_head": 4,
    "n_positions": 256,
    "n_inner": 96,
    "rotary_dim": 8,
    "unpadded_vocab_size": 120,
}

# Special token ids must lie inside the tiny vocabulary.
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Hybrid and patterned architectures whose defaults leave a tiny 4-layer model without an attention
# layer (or with a pattern the shrunk sizes break): the few settings that keep one of each kind.
EXTRA: dict[str, dict[str, object]] = {
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1, 3]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"] * 2},
    "dots3_note_text": {"num_key_value_heads": 4},
    "bailing_hybrid": {"layer_group_size": 2},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"] * 2},
}


@dataclass(frozen=True, slots=True)
class Arch:
    model_type: str
    class_name: str


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # "works", "refused", "broken"
    detail: str = ""  # the refusal or error message, or the measured logits difference
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Row:
    arch: Arch
    reference_error: str | None  # transformers itself could not build or run the tiny config
    outcomes: tuple[Outcome, ...] = ()  # one per topology
    date: str = ""  # when it ran (ISO date)
    revision: str = ""  # meshload's git commit it ran with

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Row":
        return Row(Arch(**d["arch"]), d["reference_error"], tuple(Outcome(**o) for o in d["outcomes"]), d.get("date", ""),
                   d.get("revision", ""))


def architectures() -> list[Arch]:
    """transformers' causal-LM classes whose config declares a TP plan, plus the families meshload plans."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from planning.families import BY_MODEL_TYPE

    out = []
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if model_type not in CONFIG_MAPPING:
            continue
        declared = getattr(CONFIG_MAPPING[model_type], "base_model_tp_plan", None)
        if declared or model_type in BY_MODEL_TYPE:
            out.append(Arch(model_type, class_name if isinstance(class_name, str) else class_name[0]))
    return sorted(out, key=lambda a: a.model_type)


def tiny_config(model_type: str):
    """The config class's defaults with every size in ``TINY`` it knows shrunk; the class derives the rest."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    text = default.get_text_config()
    if text is not default:  # a composite config: the causal-LM class takes its text part
        return _shrink(type(text), text, model_type)
    return _shrink(cls, default, model_type)


def _shrink(cls, default, model_type: str):
    overrides = {k: v for k, v in TINY.items() if _has(default, k)}
    overrides.update({k: v for k, v in TOKEN_IDS.items() if getattr(default, k, None) is not None})
    if _has(default, "kv_lora_rank"):  # multi-head latent attention: keys and values per query head
        overrides["num_key_value_heads"] = overrides.get("num_attention_heads", TINY["num_attention_heads"])
    overrides.update(EXTRA.get(model_type, {}))
    return cls(**overrides)


def _has(config, key: str) -> bool:
    return key in vars(config) or key in getattr(config, "attribute_map", {})


def write_checkpoint(arch: Arch, folder: str):
    """Save a seeded random model of ``arch``; returns transformers' (state, logits) of the saved folder."""
    import torch
    import transformers

    config = tiny_config(arch.model_type)
    cls = getattr(transformers, arch.class_name)
    torch.manual_seed(0)
    model = cls._from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    reference = cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(torch.tensor(PROMPT)).logits
    return reference.state_dict(), logits


def check(folder: str, *, tp: int, pp: int, state, logits, timeout_s: float) -> Outcome:
    """Plan (a meshload error here is a refusal), load over 2 nodes, compare state and logits."""
    import torch

    import orchestrator
    from planning.errors import MeshloadError

    t0 = time.perf_counter()
    try:
        plan = orchestrator.plan(folder, tp=tp, pp=pp, nodes=2)
    except MeshloadError as exc:
        return Outcome("refused", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - any other planning failure is a defect: recorded, not raised
        return Outcome("broken", f"planning: {_short(exc)}", time.perf_counter() - t0)
    try:
        with orchestrator.load(plan, progress=False, timeout_s=timeout_s, plan_cache=False) as m:
            got = m.full_state_dict()
            bad = [k for k in state if k not in got or got[k].dtype != state[k].dtype or not torch.equal(got[k], state[k])]
            extra = sorted(set(got) - set(state))
            if bad or extra:
                return Outcome("broken", f"state differs: {bad[:3]} extra {extra[:3]}", time.perf_counter() - t0)
            out = m.logits(torch.tensor(PROMPT))
            if out.shape != logits.shape:
                return Outcome("broken", f"logits shape {tuple(out.shape)} != {tuple(logits.shape)}", time.perf_counter() - t0)
            diff = (out.float() - logits.float()).abs().max().item()
            if not diff <= ATOL:
                return Outcome("broken", f"logits differ by {diff:.2e} > {ATOL}", time.perf_counter() - t0)
            return Outcome("works", f"max logits diff {diff:.1e}", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - recorded in the matrix
        return Outcome("broken", _short(exc), time.perf_counter() - t0)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def git_revision() -> str:
    """The commit of the meshload checkout this runs from (``-dirty`` with uncommitted changes), or ""."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=os.path.dirname(DOCS),
                             capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run(archs: list[Arch], *, work: str, timeout_s: float = 300.0, log=print, on_row=None) -> list[Row]:
    """Check every architecture on the local cluster (restarted if one of its nodes died); ``on_row(row)``
    after each, so an interrupted run keeps what it did."""
    rows, revision = [], git_revision()
    cluster = LocalCluster()
    try:
        for i, arch in enumerate(archs):
            folder = os.path.join(work, arch.model_type)
            t0 = time.perf_counter()
            today = datetime.date.today().isoformat()
            try:
                state, logits = write_checkpoint(arch, folder)
            except Exception as exc:  # noqa: BLE001 - transformers cannot build or run this tiny config
                row = Row(arch, _short(exc), date=today, revision=revision)
                log(f"[{i + 1}/{len(archs)}] {arch.model_type}: no reference ({_short(exc, 160)})")
            else:
                outcomes = []
                for tp, pp in TOPOLOGIES:
                    cluster.ensure()
                    outcomes.append(check(folder, tp=tp, pp=pp, state=state, logits=logits, timeout_s=timeout_s))
                row = Row(arch, None, tuple(outcomes), date=today, revision=revision)
                summary = ", ".join(f"tp={tp} pp={pp}: {o.status}" + ("" if o.status == "works" else f" ({o.detail[:160]})")
                                    for (tp, pp), o in zip(TOPOLOGIES, outcomes))
                log(f"[{i + 1}/{len(archs)}] {arch.model_type} ({time.perf_counter() - t0:.0f} s): {summary}")
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        cluster.stop()
    return rows


# Loopback addresses of its own, apart from the test suite's 127.0.0.2-4 (another pair for a second run at once).
ZOO_IPS = tuple(os.environ.get("MESHLOAD_ZOO_IPS", "127.0.0.12,127.0.0.13").split(","))


class LocalCluster:
    """The 2-node local Ray cluster (127.0.0.12-13) this process is connected to, started again if a node
    died (on a busy shared machine a raylet can miss its heartbeats and be declared dead)."""

    def __init__(self) -> None:
        self.cluster = None

    def ensure(self) -> None:
        import ray

        if self.cluster is not None and ray.is_initialized():
            if sum(1 for n in ray.nodes() if n["Alive"]) >= 2:
                return
            self.stop()
        from ray.cluster_utils import Cluster

        from orchestrator.cluster import EMBEDDED_ENV, LEAN_SYSTEM_CONFIG

        for key, value in EMBEDDED_ENV.items():
            os.environ.setdefault(key, value)
        common = dict(num_cpus=2, object_store_memory=128 << 20)
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            **common, node_ip_address=ZOO_IPS[0], include_dashboard=False, _system_config=LEAN_SYSTEM_CONFIG))
        self.cluster.add_node(**common, node_ip_address=ZOO_IPS[1])
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)

    def stop(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def render(rows: list[Row]) -> str:
    import torch
    import transformers

    counts: dict[str, int] = {}
    for row in rows:
        for o in row.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
    no_ref = sum(1 for r in rows if r.reference_error)
    dates = sorted({r.date for r in rows if r.date})
    lines = [
        "# Model zoo",
        "",
        f"Produced by `python -m benchmarks.model_zoo` (transformers {transformers.__version__}, torch "
        f"{torch.__version__}; rows ran {' to '.join(dict.fromkeys([dates[0], dates[-1]])) if dates else '-'}). "
        "Each row is one architecture's latest run (`--only` reruns replace rows; the commit each row ran "
        "with is in the last column); the raw results are in `docs/results/models.json`.",
        "",
        "Every causal-LM architecture transformers ships with a TP plan (its config's `base_model_tp_plan`),",
        "plus the families meshload adds plans for (`planning/tp_plans.py`): a tiny random model of each, built",
        "from transformers' own config class and written with `save_pretrained`, loaded by meshload at `tp=2`",
        "and at `pp=2`, each over 2 simulated nodes of a local Ray cluster, and compared with transformers'",
        f"`from_pretrained` of the same folder: state bit for bit, logits within {ATOL}.",
        "",
        "- **works**: state bit-exact, logits within tolerance (the measured difference is shown);",
        "- **refused**: `orchestrator.plan` refused it before any placement, with the message shown;",
        "- **broken**: failed after placement or differed from transformers (the error is shown);",
        "- **no reference**: transformers itself cannot build or run the tiny config (its error is shown).",
        "",
        f"{len(rows)} architectures; loads: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"; {no_ref} without a reference.",
        "",
        "| architecture | class | " + " | ".join(f"tp={tp} pp={pp}" for tp, pp in TOPOLOGIES) + " | details | ran with |",
        "| --- | --- | " + " | ".join("---" for _ in TOPOLOGIES) + " | --- | --- |",
    ]
    not_run = sorted({a.model_type: a for a in architectures()}.keys() - {r.arch.model_type for r in rows})
    if not_run:
        lines.insert(-2, f"Not run yet ({len(not_run)}; `--resume` runs them): {', '.join(not_run)}.")
        lines.insert(-2, "")
    for row in rows:
        if row.reference_error:
            cells = ["no reference"] * len(TOPOLOGIES)
            details = row.reference_error
        else:
            cells = [o.status for o in row.outcomes]
            notes = []
            for (tp, pp), o in zip(TOPOLOGIES, row.outcomes):
                if o.status != "works":
                    notes.append(f"tp={tp} pp={pp}: {o.detail}")
            details = "; ".join(notes) if notes else "; ".join(o.detail for o in row.outcomes[:1])
        lines.append(f"| {row.arch.model_type} | {row.arch.class_name} | " + " | ".join(cells) + f" | {details} | {row.revision} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated model types (default: every architecture)")
    parser.add_argument("--dry", action="store_true", help="print the matrix of this run only; write nothing")
    parser.add_argument("--work", default=None, help="folder for the tiny checkpoints (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per step of each load")
    parser.add_argument("--resume", action="store_true", help="skip architectures docs/results/models.json already has")
    args = parser.parse_args(argv)

    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    archs = architectures()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = sorted(wanted - {a.model_type for a in archs})
        if unknown:
            parser.error(f"not in the zoo: {unknown}")
        archs = [a for a in archs if a.model_type in wanted]
    if args.resume:
        done = {r.arch.model_type for r in load_results()}
        archs = [a for a in archs if a.model_type not in done]
    every = [a.model_type for a in architectures()]

    def keep(row: Row) -> None:  # results and matrix updated after every architecture
        if not args.dry:
            write(merge(load_results(), [row], keep=every))

    with tempfile.TemporaryDirectory(prefix="meshload-zoo-") as tmp:
        rows = run(archs, work=args.work or tmp, timeout_s=args.timeout, log=lambda s: print(s, flush=True), on_row=keep)
    if args.dry:
        print(render(rows))
    else:
        print(f"matrix written to {MODELS_MD} ({len(load_results())} architectures)")
    return 0


def write(rows: list[Row]) -> None:
    save_results(rows)
    with open(MODELS_MD, "w", encoding="utf-8") as f:
        f.write(render(rows))


DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
MODELS_MD = os.path.join(DOCS, "MODELS.md")
RESULTS_JSON = os.path.join(DOCS, "results", "models.json")


def load_results() -> list[Row]:
    if not os.path.exists(RESULTS_JSON):
        return []
    with open(RESULTS_JSON, encoding="utf-8") as f:
        return [Row.from_dict(d) for d in json.load(f)]


def save_results(rows: list[Row]) -> None:
    os.makedirs(os.path.dirname(RESULTS_JSON), exist_ok=True)
    with open(RESULTS_JSON, "w", encoding="utf-8") as f:
        json.dump([r.to_dict() for r in rows], f, indent=1)
        f.write("\n")


def merge(old: list[Row], new: list[Row], *, keep: list[str]) -> list[Row]:
    """``old`` with the rows of ``new`` replacing those of the same architecture; only architectures in ``keep``."""
    by_type = {r.arch.model_type: r for r in old} | {r.arch.model_type: r for r in new}
    return [by_type[t] for t in sorted(by_type) if t in keep]


if __name__ == "__main__":
    sys.exit(main())
