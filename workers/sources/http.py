"""The one HTTP helper of the sources: which failures are worth retrying, one retry/backoff policy, and
a ranged GET that resumes a body cut short.

Everything that speaks HTTP to a checkpoint source goes through here: the Hub's header reads on the
driver (``workers.sources.hub``) and its range fetches on each node (``workers.sources.hub_ranges``); whole files go
through ``huggingface_hub``'s own download (its cache layout, locks and resume) wrapped in the same
``RetryPolicy``. Requests use huggingface_hub's HTTP session (``get_session``: its proxies, headers and
certificates), so the Hub's client and ours behave the same.

- ``transient_error``: a timeout, a dropped connection, a body cut short, or HTTP 408/429/5xx anywhere
  in the cause chain; anything else (404, 401, a refused range) fails at once.
- ``RetryPolicy``: ``attempts`` tries; before try ``n + 1`` it sleeps ``min(max_backoff_s, backoff_s *
  2**n)``, jittered to 50-100 % so that many nodes retrying the same server do not retry in step.
- ``ranged_get``: bytes ``[start, stop)`` of a URL, streamed into ``write(offset, chunk)``; a server
  that ignores the range (HTTP 200) raises ``RangeIgnored`` (never read: it would be the whole file), a
  ``Content-Range`` that does not start at the asked offset or names another total size is refused, and
  a body cut short is asked again from the last byte received (the retry budget starts afresh after
  progress, as huggingface_hub's own resume does).

Runs wherever a source does I/O: the driver (resolve) and each node (fetch). No Ray.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from planning.errors import CheckpointError

try:  # huggingface_hub ≥ 2 speaks httpx2; 1.x spoke httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
EXPIRED_STATUS = (403, 404, 410)  # what an expired signed (CDN) URL answers


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _causes(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def transient_error(exc: BaseException) -> bool:
    """Worth retrying: a timeout, a dropped connection, a body cut short, or HTTP 408/429/5xx (anywhere in the cause chain)."""
    for e in _causes(exc):
        if isinstance(e, httpx.TransportError) and not isinstance(e, httpx.ProxyError):
            return True
        if http_status(e) in RETRY_STATUS:
            return True
    return False


def unreachable(exc: BaseException) -> bool:
    """The server could not be reached at all: a connection error (or timeout) in the cause chain, no HTTP answer."""
    for e in _causes(exc):
        if http_status(e) is not None:
            return False
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
            return True
    return False


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (what an error message quotes of a cause)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a request is tried again (see module docstring)."""

    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (0-based), jittered."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)

    def sleep(self, attempt: int) -> None:
        time.sleep(self.delay(attempt))

    def call(
        self,
        fn: Callable[[], object],
        *,
        retry_if: Callable[[BaseException], bool] = transient_error,
        before: Callable[[], None] | None = None,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ):
        """``fn()``, tried again while it raises what ``retry_if`` accepts, up to ``attempts`` tries; the last
        failure, or any other, propagates. ``before``: called before each try (e.g. to stop when cancelled)."""
        for attempt in range(self.attempts):
            if before is not None:
                before()
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified by retry_if
                if attempt + 1 >= self.attempts or not retry_if(exc):
                    raise
                if on_retry is not None:
                    on_retry(attempt, exc)
                self.sleep(attempt)
        raise AssertionError("unreachable")

    def resume(
        self, attempt: int, exc: BaseException, *, progressed: bool, retry: bool,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> tuple[bool, int]:
        """After try ``attempt`` of a resuming read failed with ``exc``: ``(True, next try)`` once its backoff
        is slept (``on_retry(attempt, exc)`` first), or ``(False, attempt)`` when there is none — ``retry``
        False (not a transient failure) or no tries left. A try that made ``progressed`` starts the count
        afresh: a long body cut several times is not given up on while it advances."""
        attempt = 0 if progressed else attempt
        if attempt + 1 >= self.attempts or not retry:
            return False, attempt
        if on_retry is not None:
            on_retry(attempt, exc)
        self.sleep(attempt)
        return True, attempt + 1


class RangeIgnored(Exception):
    """The server answered a range request with the whole body (HTTP 200); nothing of it was read."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to ask for the bytes: the URL and the request headers (e.g. the token, for the Hub's own origin)."""

    url: str
    headers: dict[str, str]
    signed: bool = False  # a signed URL of another origin, which may expire: answer ``refresh=True`` once


def ranged_get(
    target: Callable[[bool], Target],
    *,
    start: int,
    stop: int,
    size: int,
    file: str,
    write: Callable[[int, bytes], None],
    timeout_s: float,
    policy: RetryPolicy,
    before: Callable[[], None] | None = None,
    on_retry: Callable[[int, int, BaseException], None] | None = None,
    describe: Callable[[BaseException, int], BaseException] | None = None,
) -> int:
    """Bytes ``[start, stop)`` of ``file`` (``size`` bytes in all) into ``write(offset, chunk)``, resuming a body
    cut short (see module docstring); returns the bytes received. ``target(refresh)``: where to ask (called
    again with ``refresh=True`` once if a signed URL answers 403/404/410). ``on_retry(attempt, pos, exc)``:
    before a retry from ``pos``. Raises ``RangeIgnored``, ``CheckpointError`` for an answer that is not the
    range asked, or the final failure (``describe(exc, tries)``: the error to raise instead, from it)."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    pos, attempt, refreshed = start, 0, False
    where = target(False)
    while pos < stop:
        if before is not None:
            before()
        headers = {**where.headers, "Range": f"bytes={pos}-{stop - 1}", "Accept-Encoding": "identity"}
        before_pos = pos
        try:
            timeout = httpx.Timeout(timeout_s)
            with get_session().stream("GET", where.url, headers=headers, timeout=timeout, follow_redirects=True) as r:
                if r.status_code in EXPIRED_STATUS and where.signed and not refreshed:
                    refreshed = True  # a signed URL may have expired: ask where the bytes are again
                    where = target(True)
                    continue
                hf_raise_for_status(r)
                if r.status_code == 200:
                    raise RangeIgnored(f"{file}: {urlsplit(where.url).netloc} ignored a range request (HTTP 200)")
                first, _, total = r.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
                if r.status_code != 206 or not first.startswith(f"{pos}-") or total not in ("*", str(size)):
                    raise CheckpointError(
                        f"{file}: asked for bytes {pos}-{stop - 1} of {size}, got HTTP {r.status_code} "
                        f"with Content-Range {r.headers.get('Content-Range')!r}"
                    )
                for chunk in r.iter_bytes():
                    chunk = chunk[: stop - pos]
                    write(pos, chunk)
                    pos += len(chunk)
                    if pos >= stop:
                        break
            if pos < stop:
                raise httpx.RemoteProtocolError(f"body ended after {pos - start} of {stop - start} bytes")
        except (RangeIgnored, CheckpointError):
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            again, attempt = policy.resume(attempt, exc, progressed=pos > before_pos, retry=transient_error(exc),
                                           on_retry=None if on_retry is None else lambda a, e: on_retry(a, pos, e))
            if again:
                continue
            if describe is None:
                raise
            raise describe(exc, attempt + 1) from exc
    return pos - start
