"""Where a rank keeps the tensors its plan offloads (``ParamPlan.offload``, see ``planning.offload``).

- ``"cpu"``: host memory, page-locked when the rank has a GPU (so the forward's copies to the device are
  asynchronous DMA). Pinning is a constructor argument, so CPU tests run the same code with it off.
- ``"disk"``: no copy at all when the tensor is one contiguous range of a checkpoint file in its dtype —
  the reader's zero-copy view (``workers.reader.zero_copy_view``) of the checkpoint file itself. A tensor
  that is not (a cast, a strided TP slice, padding, one the checkpoint lacks) goes to a file of the
  rank's own: an unnamed file (``O_TMPFILE``) in ``$MESHLOAD_OFFLOAD_DIR`` (on the rank's node), else the
  system's temporary folder, mapped shared. It has no name from the moment it exists, so nothing is
  left on disk whatever happens to the rank: its blocks are freed when the rank lets go of the tensor
  (at shutdown, or when its process dies).

After a disk tensor is written, and each time the forward has streamed it to the device, its pages are
dropped from the rank's resident memory (``release``); they stay in the page cache, or on disk. Linux may
map a whole page-cache folio (up to ``folio_reach()`` bytes) when one page of it is touched, so reading a
checkpoint view can map its neighbours' pages too: the streamer drops those as well. For a
checkpoint view this goes through the rank's ``FileGuard``: if the file's lease broke, the view is
anonymous memory now (``workers.file_guard``) and is left alone.

Runs on every rank (inside the Ray actor).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import torch

from planning.plan import ParamPlan
from planning.skeleton import parse_dtype

OFFLOAD_DIR_ENV = "MESHLOAD_OFFLOAD_DIR"


def folio_reach() -> int:
    """Bytes around a touched page that Linux may map with it: the largest page-cache folio, a PMD
    (``hpage_pmd_size``; 2 MiB on x86-64). On kernels with large folios in the page cache (ext4 from 6.16,
    xfs, tmpfs), touching one page of a file maps the whole folio holding it — neighbouring tensors' pages too."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


def _madvise_dontneed(tensor: torch.Tensor) -> None:
    """Drop the pages of ``tensor``'s bytes from this process (whole pages inside its range only)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    if end - start >= mmap.PAGESIZE:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t((end - start) // mmap.PAGESIZE * mmap.PAGESIZE), mmap.MADV_DONTNEED)


class OffloadStore:
    """See module docstring. ``pin``: page-lock "cpu" tensors (ranks with a GPU). ``guard``: the rank's
    ``workers.file_guard.FileGuard`` (for checkpoint views). ``folder``: where the rank's own files go
    (default: ``$MESHLOAD_OFFLOAD_DIR``, else the temporary folder)."""

    def __init__(self, *, pin: bool, guard=None, folder: str | None = None) -> None:
        self.pin = pin
        self._guard = guard
        self.folder = folder or os.environ.get(OFFLOAD_DIR_ENV) or tempfile.gettempdir()
        self._views: dict[str, str] = {}  # tensor name → checkpoint file it views
        self._own: set[str] = set()  # tensors in files of the rank's own
        self.own_file_bytes = 0

    def host(self, p: ParamPlan) -> torch.Tensor:
        """An empty "cpu" tensor for ``p`` (zeros where it holds padding rows)."""
        t = torch.empty(p.shape, dtype=parse_dtype(p.dtype), pin_memory=self.pin)
        if p.shard is not None and p.shard.padding:
            t.zero_()
        return t

    def own_file(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor of ``shape`` backed by an unnamed file of the rank's own in ``folder``."""
        nbytes = max(1, int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size())
        try:
            with tempfile.TemporaryFile(prefix="meshload-offload-", dir=self.folder) as f:
                os.ftruncate(f.fileno(), nbytes)
                mapping = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise OSError(exc.errno, f"{name}: cannot make a file of {nbytes} bytes for disk offload in {self.folder} "
                                     f"(${OFFLOAD_DIR_ENV}): {exc.strerror}") from None
        self._own.add(name)
        self.own_file_bytes += nbytes
        count = int(torch.Size(shape).numel())
        return torch.frombuffer(mapping, dtype=dtype, count=count).view(shape) if count else torch.empty(shape, dtype=dtype)

    def viewing(self, name: str, file: str) -> None:
        """``name`` is a zero-copy view of checkpoint file ``file``."""
        self._views[name] = file

    def file_of(self, name: str) -> str | None:
        """The checkpoint file that ``name`` is a view of (None if it is not one)."""
        return self._views.get(name)

    def kind(self, name: str) -> str | None:
        """``"checkpoint"`` (a view of a checkpoint file), ``"own"`` (a file of the rank's own) or None."""
        return "checkpoint" if name in self._views else "own" if name in self._own else None

    def settle(self, p: ParamPlan, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (made on the rank: initialised, or otherwise not where the plan puts it) moved to ``p``'s tier."""
        if p.offload == "cpu":
            return tensor.to("cpu").pin_memory() if self.pin else tensor.to("cpu", copy=True)
        out = self.own_file(p.name, tuple(tensor.shape), tensor.dtype)
        out.copy_(tensor)
        self.release(p.name, out)
        return out

    def release(self, name: str, tensor: torch.Tensor) -> None:
        """Drop a disk tensor's pages from the rank's resident memory (see module docstring); others: nothing."""
        if name in self._own:
            _madvise_dontneed(tensor)
        elif name in self._views and self._guard is not None:
            self._guard.drop_pages(self._views[name], lambda: _madvise_dontneed(tensor))
