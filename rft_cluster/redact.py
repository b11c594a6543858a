"""Secrets out of everything the project writes or prints: one redactor, applied at every sink.

What counts as a secret:
- every value a job's `${VAR}` expanded to (`config.load_job` records them), value by value,
  wherever it appears: a header, a URL's query or path, an error text that quotes the URL. It
  is shown as `${VAR}`, so the user still sees which variable was there. Its URL-encoded forms
  are replaced too (aiohttp quotes URLs in its error texts). Values shorter than
  `MIN_SECRET_CHARS` are left alone: they are not secrets, and replacing "1" would mangle text.
- the userinfo of any URL (`https://user:pass@host`), shown as `https://***@host`; and for the
  job's own URLs, the password and the `Authorization: Basic` form aiohttp derives from them
  (base64 of `user:pass`), wherever they appear (an endpoint echoing the header), as `<redacted>`;
- every header value (a dict under a `headers` key), shown as `<redacted>`: literal tokens too.

Matching ignores case: aiohttp lower-cases a host, so a secret in one comes back lower-cased.
Text is redacted before it is cut (`clip`): a secret straddling the cut is replaced whole.

The redactor is a small picklable value: it travels to the Ray actors that need it (tool
proxies, graders) with their other constructor arguments.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

REDACTED = "<redacted>"
MIN_SECRET_CHARS = 4
# A scheme starts where no scheme character precedes it, and neither run backtracks: one pass
# over `a.a.a.…` (a `\b` start and backtracking made that quadratic: 80 KB took 15 s).
_SCHEME = r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*+://"
_USERINFO = re.compile(rf"(?i)({_SCHEME})[^/?#\s@'\"<>]++@")
# A URL whose userinfo may go on past the end of a cut text (no `@` yet).
_OPEN_USERINFO = re.compile(rf"(?i){_SCHEME}[^/?#\s@'\"<>]*+\Z")
# How far past a cut `clip` looks at least: a secret reaches its longest encoding (12 characters
# per character: `%F0%9F%98%80`) past its start.
_CUT_MARGIN = 4096
# Secrets up to this long are matched in any mix of their characters' encodings.
_PER_CHARACTER_UP_TO = 256


class Redactor:
    """Replaces the secrets it knows in strings and (copies of) JSON-like structures: each
    variable's value (shown as `${NAME}`) and each `hidden` value (shown as `<redacted>`)."""

    def __init__(self, secrets: Mapping[str, str] | None = None, hidden: Iterable[str] = ()):
        self.secrets = dict(secrets or {})  # variable name -> value
        self.hidden = sorted(set(hidden))
        shown = {v: f"${{{n}}}" for n, v in self.secrets.items()} | {v: REDACTED for v in self.hidden if v not in self.secrets.values()}
        values = sorted((v for v in shown if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)
        # Longest first: a value that contains another is replaced whole.
        self._pattern = re.compile("|".join(f"({_encodings(v)})" for v in values), re.IGNORECASE) if values else None
        self._shown = [shown[v] for v in values]
        self._margin = max([_CUT_MARGIN] + [12 * len(v) for v in values])

    def __reduce__(self):
        return (Redactor, (self.secrets, self.hidden))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Redactor) and (other.secrets, other.hidden) == (self.secrets, self.hidden)

    def __repr__(self) -> str:
        return f"Redactor({sorted(self.secrets)})"  # the names, never the values

    def text(self, s: str) -> str:
        return self._redacted_head(s, len(s), whole=True)

    def clip(self, s: str, limit: int) -> str:
        """`s` redacted, then cut to `limit` characters (marked `…`): a secret straddling the cut
        is replaced whole. Only a window of `s` reaching past the cut is redacted, so the cost
        does not grow with `s`; the window doubles while the part of it no later character can
        change is no longer than `limit` (replacements shrink text: a repeated long secret)."""
        end = limit + self._margin
        while end < len(s):
            head = self._redacted_head(s[:end], end - self._margin, whole=False)
            if len(head) > limit:
                return head[:limit] + "…"
            end *= 2
        head = self.text(s)
        return head if len(head) <= limit else head[:limit] + "…"

    def _redacted_head(self, s: str, stable: int, whole: bool) -> str:
        """`s` redacted, as far as no character after it can change that: secrets starting
        before `stable` (each ends within `_margin` of its start) and the text up to there,
        short of a URL whose userinfo reaches the end. All of `s` when `whole`."""
        pieces, at = [], 0
        for m in self._pattern.finditer(s) if self._pattern is not None else ():
            if m.start() >= stable:
                break
            pieces += [s[at:m.start()], self._shown[m.lastindex - 1]]
            at = m.end()
        pieces.append(s[at:max(at, stable)])
        head = "".join(pieces)
        if not whole and (open_url := _OPEN_USERINFO.search(head)):
            head = head[:open_url.start()]
        return _USERINFO.sub(r"\1***@", head)

    def __call__(self, obj: Any) -> Any:
        """A redacted copy of `obj` (strings, dicts, lists, tuples; other values as they are).
        Header names stay visible (useful to see which were set); their values do not."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {self(k): _header_values(v) if k == "headers" else self(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            # Token ids and logprobs hold no text: copied without a call per number.
            if not any(isinstance(v, (str, Mapping, list, tuple)) for v in obj):
                return list(obj)
            return [self(v) for v in obj]
        return obj


def _encodings(value: str) -> str:
    """A pattern matching `value` however a URL or JSON writer encoded each of its characters:
    as is, percent-encoded (either case of hex), `+` for a space, or JSON-escaped. URL quoters
    differ in which characters they leave alone (yarl keeps `/` and `+` in a query, quote()
    does not), so every character may take any of its forms."""
    if len(value) > _PER_CHARACTER_UP_TO:  # a pattern per character would take seconds to build: the whole value's forms
        return "|".join(sorted({re.escape(v) for v in (value, json.dumps(value)[1:-1], quote(value, safe=""), quote_plus(value))}))
    parts = []
    for c in value:
        forms = {re.escape(c), re.escape(json.dumps(c)[1:-1])}
        forms |= {"".join(f"%{b:02X}" for b in c.encode()), "".join(f"%{b:02x}" for b in c.encode())}
        if c == " ":
            forms.add(r"\+")
        parts.append(f"(?:{'|'.join(sorted(forms))})")
    return "".join(parts)


def url_credentials(strings: Iterable[str]) -> list[str]:
    """What to hide of every URL with credentials among `strings`: its password and the
    `Basic` authorization aiohttp sends for it (base64 of `user:password`, Latin-1)."""
    found = []
    for s in strings:
        if "@" not in s or not (m := _USERINFO.search(s)):
            continue
        try:
            parts = urlsplit(s[m.start():])
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            # `https://TOKEN@host`: the user alone may be the secret.
            found += [v for v in (user, password) if v] + [base64.b64encode(f"{user}:{password}".encode("latin-1")).decode()]
        except (ValueError, UnicodeEncodeError):  # not a URL aiohttp could send: refused by validate
            continue
    return found


def strings_in(obj: Any) -> Iterator[str]:
    """Every string in a JSON-like structure, keys included."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple)):
            stack += value


def process_redactor() -> Redactor:
    """The redactor of this process's job (`redact_logs`), else one that hides URL credentials only."""
    return _log_redactor or Redactor()


def _header_values(headers: Any) -> Any:
    if isinstance(headers, Mapping):
        return {name: REDACTED for name in headers}
    return REDACTED


# The redactor log records of this process pass through (see `redact_logs`).
_log_redactor: Redactor | None = None


def redact_logs(redactor: Redactor) -> None:
    """Redacts every log record this process makes from now on, whatever logger or handler
    (ours, aiohttp's, Ray's): the message and any traceback are redacted as the record is made.
    A process holds one redactor: a later call replaces it (one job per process)."""
    global _log_redactor
    if _log_redactor is None:
        make = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make(*args, **kwargs)
            if _log_redactor is None:
                return record
            try:
                message = record.getMessage()
            except Exception:  # a malformed call: left for logging to report as it does
                return record
            # A record is rewritten only when it held a secret: formatters that read `args`
            # (access logs) keep working on every other record.
            if (clean := _log_redactor.text(message)) != message:
                record.msg, record.args = clean, None
            if record.exc_info:
                record.exc_text = _log_redactor.text(logging.Formatter().formatException(record.exc_info))
            return record

        logging.setLogRecordFactory(factory)
    _log_redactor = redactor
