"""POSTing JSON to users' endpoints with the discipline of docs/architecture.md §4: one session,
bounded concurrency per endpoint host, per-attempt timeout, exponential backoff on 5xx/connection
errors/timeouts, 429 retried after its `Retry-After`, an optional rate limit, and size caps both
ways. Shared by the tool proxy and the endpoint and score_model graders; `HttpOutcome` says what
went wrong in one wording and reads the body under one rule (`untrusted.loads`), so the three
differ only in what they do with it (the proxy shows a 4xx to the model, graders fail).

Retrying is written here rather than with a library: none is installed (no tenacity/backoff),
and the loop is a dozen lines. The rate limiter spaces requests evenly, which a token bucket
(aiolimiter) would not: it lets a burst through.

Header values are never logged: they carry users' secrets.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from rft_cluster.config import RETRY_AFTER_MAX_S, ToolSettings
from rft_cluster.redact import process_redactor
from rft_cluster.types import dumps_strict
from rft_cluster.untrusted import loads

log = logging.getLogger(__name__)

# How much of an endpoint's body an error message quotes (to the model, in a grader error):
# enough to act on, cheap in context.
ERROR_TEXT_CHARS = 1000


def clip(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters, redacted first by this process's job redactor: a
    secret straddling the cut is replaced whole, never shown in part."""
    return process_redactor().clip(text, limit)


class Failure(str, Enum):
    """Why a POST produced no usable response (after retries, where retrying applies)."""

    REQUEST_TOO_LARGE = "request_too_large"  # not sent
    RESPONSE_TOO_LARGE = "response_too_large"  # 2xx body over the cap; not retried
    SERVER = "server"  # 5xx on every attempt
    RATE_LIMITED = "rate_limited"  # 429 on the last attempt
    CONNECTION = "connection"
    TIMEOUT = "timeout"


@dataclass
class HttpOutcome:
    """The last response (or failure) of one logical POST, with its accounting."""

    status: int | None  # HTTP status of the last response; None if none arrived
    body: bytes  # body of the last response, at most max_response_bytes + 1 bytes
    failure: Failure | None
    detail: str  # why it failed, for humans; "" on success
    attempts: int  # HTTP requests actually sent
    latency_s: float  # wall time including retries, backoff and rate-limit waits

    def text(self, limit: int = ERROR_TEXT_CHARS) -> str:
        """The body as text, cut to `limit` characters."""
        return clip(self.body.decode("utf-8", errors="replace"), limit)

    def error(self) -> str | None:
        """Why no usable 2xx body arrived, in one line quoting the body; None when one did."""
        if self.failure is Failure.REQUEST_TOO_LARGE:
            return f"not sent: {self.detail}"
        if self.failure is Failure.RESPONSE_TOO_LARGE:
            return f"HTTP 413: {self.detail}"
        if self.failure is not None:
            return f"{self.detail} (after {self.attempts} attempts)"
        assert self.status is not None  # no failure means a response arrived
        if not 200 <= self.status < 300:
            return f"HTTP {self.status}: {self.text()}"
        return None

    def field(self, *path: str | int) -> Any:
        """The value at `path` in the JSON body (`field("choices", 0, "message")`), or None when
        the body is not JSON or has nothing there."""
        try:
            value = loads(self.body)
            for key in path:
                value = value[key]
        except (ValueError, TypeError, KeyError, IndexError):
            return None
        return value

    def missing(self, what: str) -> str:
        """The error for a 2xx body without `what`."""
        return f"HTTP {self.status} response has no {what}: {self.text()}"


class RateLimiter:
    """Spaces requests evenly at `per_minute` (a reservation clock, so waiters never block
    each other while sleeping)."""

    def __init__(self, per_minute: int):
        self._interval = 60.0 / per_minute
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


class _Retryable(Exception):
    def __init__(
        self, failure: Failure, detail: str, status: int | None = None, body: bytes = b"", retry_after: float | None = None
    ):
        super().__init__(detail)
        self.failure, self.detail, self.status, self.body = failure, detail, status, body
        self.retry_after = retry_after  # seconds the server asked us to wait, if it did


def retry_after_s(value: str | None) -> float | None:
    """A `Retry-After` header (delay-seconds or an HTTP date) as seconds from now, capped at
    RETRY_AFTER_MAX_S; None when absent or unreadable (the backoff applies then)."""
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):  # ASCII digits only: `str.isdigit` takes "²", which float() refuses
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except Exception:  # noqa: BLE001 - whatever a malformed date raises in the parser: the backoff applies
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)  # a huge delay (1e400 is inf) is the longest


_DELAY_SECONDS = re.compile(r"[0-9]+")


def _host(url: str) -> str:
    """The endpoint host a concurrency limit applies to: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class JsonPoster:
    """POSTs JSON payloads; owns one aiohttp session, created lazily in the running loop so the
    object can be built outside it (e.g. in a Ray actor's constructor).

    At most `settings.max_concurrency` requests are in flight to one endpoint host (scheme,
    host, port): the limit protects each user service, and one slow service does not hold back
    calls to another."""

    def __init__(self, settings: ToolSettings, rate_limit_per_minute: int | None = None):
        self._settings = settings
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute else None
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # The semaphores bound concurrency per host (so the pool never queues: it may keep
            # one connection per permitted request); per-attempt timeouts are ours
            # (asyncio.timeout), so the session has no timeout of its own.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=self._settings.max_concurrency),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def post(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> HttpOutcome:
        started = time.monotonic()
        data = dumps_strict(payload)  # NaN/Infinity (not JSON) go as null: everything sent is strict JSON
        cap = self._settings.max_request_bytes
        if len(data) > cap:
            detail = f"request body is {len(data)} bytes, over the limit of {cap} bytes"
            return HttpOutcome(None, b"", Failure.REQUEST_TOO_LARGE, detail, 0, 0.0)
        send_headers = {"Content-Type": "application/json", **headers}
        async with self._semaphore(url):
            attempt = 0
            while True:
                if self._limiter is not None:
                    await self._limiter.wait()
                try:
                    status, body = await self._attempt(url, data, send_headers)
                except _Retryable as e:
                    if attempt >= self._settings.max_retries:
                        return HttpOutcome(e.status, e.body, e.failure, e.detail, attempt + 1, time.monotonic() - started)
                    delay = e.retry_after if e.retry_after is not None else self._settings.backoff_s * 2**attempt
                    # The query string is left out of logs like the headers: it may carry a key.
                    where = url.split("?", 1)[0]
                    log.warning("POST %s attempt %d failed (%s); retrying in %.2fs", where, attempt + 1, e.detail, delay)
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                elapsed = time.monotonic() - started
                cap = self._settings.max_response_bytes
                if 200 <= status < 300 and len(body) > cap:
                    # Deterministic, so not retried; 4xx bodies are merely cut by the reader.
                    detail = f"response exceeds {cap} bytes"
                    return HttpOutcome(status, body, Failure.RESPONSE_TOO_LARGE, detail, attempt + 1, elapsed)
                return HttpOutcome(status, body, None, "", attempt + 1, elapsed)

    def _semaphore(self, url: str) -> asyncio.Semaphore:
        host = _host(url)
        if host not in self._semaphores:
            self._semaphores[host] = asyncio.Semaphore(self._settings.max_concurrency)
        return self._semaphores[host]

    async def _attempt(self, url: str, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """One request → (status, capped body); raises `_Retryable` for what a retry may fix."""
        timeout_s = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                async with self._get_session().post(url, data=data, headers=headers, allow_redirects=False) as resp:
                    body = await _read_capped(resp, self._settings.max_response_bytes)
        except TimeoutError:
            raise _Retryable(Failure.TIMEOUT, f"no complete response within {timeout_s}s") from None
        except aiohttp.ClientError as e:
            raise _Retryable(Failure.CONNECTION, f"{type(e).__name__}: {e}") from None
        # A 429 is the service pacing us, not something the model did: it is waited out, never
        # shown (the one 4xx that is not). A 5xx may ask for a wait too.
        if resp.status == 429 or resp.status >= 500:
            failure = Failure.RATE_LIMITED if resp.status == 429 else Failure.SERVER
            raise _Retryable(failure, f"HTTP {resp.status}", resp.status, body, retry_after_s(resp.headers.get("Retry-After")))
        return resp.status, body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """Reads at most cap + 1 bytes, so an oversized body is detected without buffering it."""
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await resp.content.read(cap + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class _Built(Exception):
    """Raised where a request would connect: everything before it was built as it is sent."""


class _BuildOnly(aiohttp.BaseConnector):
    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        self.request = req
        raise _Built


async def request_problem(url: str, headers: dict[str, str]) -> str | None:
    """Why aiohttp would refuse to send a POST of JSON to `url` with `headers` (credentials in the
    URL beside an `Authorization` header, a URL it cannot parse, a header it would not write), or
    None. The request is built exactly as `JsonPoster` builds it; nothing is sent. The reason
    never quotes the URL (it may hold a secret)."""
    # The writer's own check (no line breaks, no NUL), private to aiohttp: the check is exactly what it sends.
    from aiohttp.http_writer import _serialize_headers

    connector = _BuildOnly()
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            await session.post(url, data=b"{}", headers={"Content-Type": "application/json", **headers}, allow_redirects=False)
        except _Built:
            try:
                _serialize_headers("POST / HTTP/1.1", connector.request.headers)
            except ValueError as e:
                return f"aiohttp would not send its headers: {e}"
            return None
        except aiohttp.InvalidURL:
            return "aiohttp cannot parse the URL"
        except (ValueError, TypeError, aiohttp.ClientError) as e:  # UnicodeError is a ValueError
            return f"aiohttp would not send it: {type(e).__name__}: {e}"
    return "aiohttp neither built nor refused the request"  # unreachable: post() returns only after connecting
