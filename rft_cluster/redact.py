"""Secrets out of everything the project writes or prints: one redactor, applied at every sink.

What counts as a secret:
- every value a job's `${VAR}` expanded to (`config.load_job` records them), value by value,
  wherever it appears: a header, a URL's query or path, an error text that quotes the URL. It
  is shown as `${VAR}`, so the user still sees which variable was there. Its URL-encoded forms
  are replaced too (aiohttp quotes URLs in its error texts). Values shorter than
  `MIN_SECRET_CHARS` are left alone: they are not secrets, and replacing "1" would mangle text.
- the userinfo of any URL (`https://user:pass@host`), shown as `https://***@host`;
- every header value (a dict under a `headers` key), shown as `<redacted>`: literal tokens too.

The redactor is a small picklable value: it travels to the Ray actors that need it (tool
proxies, graders) with their other constructor arguments.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
MIN_SECRET_CHARS = 4
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s@'\"<>]+@")


class Redactor:
    """Replaces the secrets it knows in strings and (copies of) JSON-like structures."""

    def __init__(self, secrets: Mapping[str, str] | None = None):
        self.secrets = dict(secrets or {})  # variable name -> value
        values = sorted((v for v in self.secrets.values() if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)
        # Longest first: a value that contains another is replaced whole.
        self._pattern = re.compile("|".join(f"({_encodings(v)})" for v in values)) if values else None
        self._names = [next(n for n, v in self.secrets.items() if v == value) for value in values]

    def __reduce__(self):
        return (Redactor, (self.secrets,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Redactor) and other.secrets == self.secrets

    def __repr__(self) -> str:
        return f"Redactor({sorted(self.secrets)})"  # the names, never the values

    def text(self, s: str) -> str:
        if self._pattern is not None:
            s = self._pattern.sub(lambda m: f"${{{self._names[m.lastindex - 1]}}}", s)
        return _USERINFO.sub(r"\1***@", s)

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
    parts = []
    for c in value:
        forms = {re.escape(c), re.escape(json.dumps(c)[1:-1])}
        forms |= {"".join(f"%{b:02X}" for b in c.encode()), "".join(f"%{b:02x}" for b in c.encode())}
        if c == " ":
            forms.add(r"\+")
        parts.append(f"(?:{'|'.join(sorted(forms))})")
    return "".join(parts)


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
