"""Each rank reads only its share, as the kernel counts it.

The reader's own byte count can only show what the reader meant to read. Here every rank's process reports
its kernel counters (``/proc/<pid>/io``: ``rchar``, the bytes its ``read``/``pread`` calls returned, any
thread, any file) around the read phase, and the test holds them to the plan: the rank's planned bytes
plus the header of each file it opens (each node checks its copy's header before reading), within a
slack smaller than the smallest tensor a rank reads. So one extra read of any single tensor — of the
smallest, a norm's weight — shows; the test proves it by injecting exactly that read.

``rchar`` counts ``read``/``pread``/``preadv`` calls, not page faults nor io_uring completions, so the ranks
copy every shard (``zero_copy=False``) through the pool of ``preadv`` threads (``MESHLOAD_NO_URING=1``,
the documented switch): the same chunks at the same offsets that io_uring would read.
"""

from __future__ import annotations

import os

import pytest

import orchestrator
from tests import checkpoints
from tests.conftest import wait_until_clean
from workers import uring
from workers.rank_worker import RankWorker

pytestmark = pytest.mark.cluster

# 16 KiB norms (hidden 4096, float32) are the smallest tensors a rank reads; the slack is half of one (the
# read phase's own noise, a few Ray threads' reads, measured at 0.1-2.6 KB). Narrow heads keep the model small.
HIDDEN = 4096
SLACK = 8 << 10


def counting_worker(marker_dir: str, *, extra_read_of: str | None = None) -> type:
    """A RankWorker that writes to ``marker_dir`` how many bytes its process's read calls returned (the kernel's
    ``rchar``) over its read phase; with ``extra_read_of``, it reads that tensor's bytes once more meanwhile."""

    def rchar() -> int:
        with open(f"/proc/{os.getpid()}/io", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    class CountsKernelReads(RankWorker):
        def __init__(self, *args, **kwargs):
            os.environ["MESHLOAD_NO_URING"] = "1"  # before the first read decides (workers.uring.available)
            super().__init__(*args, **kwargs)

        def _read(self, paths, jobs_for, *, staging=None):
            # The read phase alone: the files opened (and their headers checked) and every planned range read;
            # not the model build that load() starts in the background as it returns.
            assert not uring.available(), "io_uring reads are not counted in rchar: this rank would measure nothing"
            # A rank started before its plan imports transformers' model code meanwhile (reading .py files in
            # another thread of this process); let it finish, so that the window holds the read phase only.
            if self._skeleton_thread.ident is not None:
                self._skeleton_thread.join()
            before = rchar()
            out = super()._read(paths, jobs_for, staging=staging)
            if extra_read_of is not None and any(p.name == extra_read_of for p in self.rank_plan.params):
                item = next(r for p in self.rank_plan.params if p.name == extra_read_of for r in p.reads)
                fd = os.open(paths[item.file], os.O_RDONLY)
                try:
                    os.pread(fd, item.nbytes, item.file_offset)
                finally:
                    os.close(fd)
            with open(os.path.join(marker_dir, f"rank{self.rank}"), "w") as f:
                f.write(f"{rchar() - before}")
            return out

    return CountsKernelReads


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wide-llama"))
    checkpoints.llama(path, tied=False, shard="8MB", hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=64, intermediate_size=64, num_hidden_layers=2)
    return path, checkpoints.state_of(path)


# tp=2 with every linear layer cut column-wise: row-wise cuts (o_proj, down_proj) are strided in the file and are
# copied from its mapping, through page faults that no /proc counter attributes byte for byte; column-wise cuts
# are contiguous ranges, read by preadv. The state is still transformers' (only the forward would differ).
COLUMNWISE = {"model.layers.*.self_attn.o_proj": "colwise", "model.layers.*.mlp.down_proj": "colwise"}
LAYOUTS = {"tp2": dict(tp=2, pp=1, tp_plan=COLUMNWISE), "pp2": dict(tp=1, pp=2)}


def _kernel_reads(path: str, marker_dir, layout: dict, *, extra_read_of: str | None = None):
    with orchestrator.load(path, nodes=2, zero_copy=False, progress=False, **layout,
                           worker_cls=counting_worker(str(marker_dir), extra_read_of=extra_read_of)) as m:
        plan, state = m.plan, m.full_state_dict()
    assert wait_until_clean() == ([], [])
    counted = {r: int((marker_dir / f"rank{r}").read_text()) for r in range(plan.world_size)}
    headers = {f.name: f.header_size for f in plan.files}
    expected = {r.rank: r.read_bytes + sum(headers[name] for name in r.files) for r in plan.ranks}
    return plan, state, counted, expected


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_rank_reads_its_planned_bytes_as_the_kernel_counts_them(ray_cluster, wide_llama, tmp_path, layout):
    path, oracle = wide_llama
    plan, state, counted, expected = _kernel_reads(path, tmp_path, LAYOUTS[layout])
    checkpoints.assert_state_equal(state, oracle)
    assert all(r.read_bytes < plan.totals.checkpoint_bytes * 0.75 for r in plan.ranks)  # a share, not the checkpoint
    smallest = min(item.nbytes for r in plan.ranks for p in r.params for item in p.reads)
    assert smallest > SLACK, f"the smallest read ({smallest} bytes) must exceed the slack ({SLACK}) for this test to see a double read"
    excess = {r: counted[r] - expected[r] for r in counted}
    print(f"{layout}: kernel rchar - planned bytes per rank: {excess} (planned {expected})")
    assert all(0 <= e <= SLACK for e in excess.values()), (excess, expected)


def test_one_extra_read_of_the_smallest_tensor_is_seen(ray_cluster, wide_llama, tmp_path):
    """The check above cannot miss a double read: reading a norm's weight once more exceeds the slack."""
    path, _ = wide_llama
    norm = "model.norm.weight"
    plan, _, counted, expected = _kernel_reads(path, tmp_path, LAYOUTS["tp2"], extra_read_of=norm)
    for rank in plan.ranks:
        assert any(p.name == norm for p in rank.params)
        assert counted[rank.rank] - expected[rank.rank] > SLACK, (counted, expected)
