"""The three tools over a corpus directory — `search`, `list`, `cat` — as plain functions of their
JSON arguments. The tool server and the scripted demonstrations both call `FinQATools.call`, so a
demonstration's tool output is exactly what the server would answer.

Every path is relative to the corpus root and must stay inside it: absolute paths, `..` that
climbs out and symlinks that point out are refused (HTTP 403). Hidden entries (the search
cache) are neither listed nor readable. A path the OS cannot take (a NUL byte, a name over its
length limit) is the model's mistake, answered 400 like any other bad argument. Only regular
UTF-8 files are reports: anything else in the tree (a FIFO, a binary) is skipped, so it can
neither hang nor crash the server.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rft_cluster.envs.endpoints import ToolError
from rft_cluster.envs.finqa.search import Backend, make_searcher
from rft_cluster.untrusted import loads

log = logging.getLogger(__name__)
DEFAULT_K = 3
MAX_K = 10

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Find reports by meaning. Returns the top-k report paths, each with its title.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "k": {"type": "integer", "description": f"results, 1-{MAX_K} (default {DEFAULT_K})"},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "list",
            "description": "List a directory of the corpus, e.g. acme-foods/2019 ('' is the root).",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "cat",
            "description": "Read one report, e.g. acme-foods/2019/Q3.txt.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_NAMES = tuple(tool["function"]["name"] for tool in TOOLS)


class FinQATools:
    """The tools over the reports (`*.txt`) under `root`. Search indexes each report's first line
    (its title), not the whole report: embedding 2,800 whole reports takes over a minute on 2
    cores and ranks worse, the numbers drowning the company and period a query names (a report's
    own title found it first 14 % of the time)."""

    def __init__(self, root: str | Path, backend: Backend = "auto"):
        self.root = Path(root).resolve()
        titles: dict[str, str] = {}
        for p in sorted(self.root.rglob("*.txt")):
            rel = p.relative_to(self.root)
            # is_file() first: opening a FIFO would block until a writer came.
            if not (p.is_file() and self._inside(p.resolve())) or _hidden(rel.parts):
                continue
            try:
                titles[rel.as_posix()] = _first_line(p.read_text())
            except (UnicodeDecodeError, OSError) as e:
                log.warning("%s: skipped, not a readable UTF-8 report (%s)", p, e)
        if not titles:
            raise ValueError(f"{self.root}: no reports (*.txt) to serve")
        self.paths, self.titles = list(titles), list(titles.values())
        self.searcher = make_searcher(self.titles, backend, cache_dir=self.root)

    def call(self, name: Any, arguments: Any) -> str:
        """The output of one call (`arguments` a JSON object string, as the protocol carries it);
        raises ToolError for a call the tools refuse, malformed ones included."""
        try:
            args = loads(arguments)  # nesting too deep for the parser is a ValueError too
        except (TypeError, ValueError):
            raise ToolError(400, "arguments must be a JSON object string") from None
        if not isinstance(args, dict):
            raise ToolError(400, "arguments must be a JSON object")
        if name == "search":
            query, k = args.get("query"), args.get("k", DEFAULT_K)
            if not isinstance(query, str) or not query.strip():
                raise ToolError(400, 'search needs {"query": "<text>"}')
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
                raise ToolError(400, f"k must be an integer from 1 to {MAX_K}")
            return self.search(query, k)
        if name in ("list", "cat"):
            path = args.get("path", "" if name == "list" else None)
            if not isinstance(path, str):
                raise ToolError(400, f'{name} needs {{"path": "<path relative to the corpus root>"}}')
            return self.list(path) if name == "list" else self.cat(path)
        raise ToolError(400, f"unknown tool {name!r}; this server serves {', '.join(TOOL_NAMES)}")

    def search(self, query: str, k: int = DEFAULT_K) -> str:
        hits = self.searcher.top_k(query, k)
        if not hits:
            return "no matching reports"
        return "\n".join(f"{self.paths[i]}: {self.titles[i]}" for i in hits)

    def list(self, path: str = "") -> str:
        directory = self._resolve(path)
        if not directory.is_dir():
            raise ToolError(400 if directory.exists() else 404, f"{path!r} is not a directory")
        entries = sorted(e for e in directory.iterdir() if not e.name.startswith("."))
        if not entries:
            return "(empty directory)"
        # Names, as `ls` prints them (directories with a "/"): full paths cost the agent ~3x the tokens.
        return "\n".join(e.name + ("/" if e.is_dir() else "") for e in entries)

    def cat(self, path: str) -> str:
        file = self._resolve(path)
        if file.is_dir():
            raise ToolError(400, f"{path!r} is a directory; use list")
        if not file.is_file():  # a FIFO or device is no report either (and reading it could block)
            raise ToolError(404, f"no such report: {path!r}")
        try:
            return file.read_text().rstrip("\n")
        except UnicodeDecodeError:
            raise ToolError(400, f"{path!r} is not a text report") from None

    def _resolve(self, path: str) -> Path:
        """The real path inside the root that `path` names; ToolError if it names anything
        outside (resolving symlinks first, so a link cannot lead out) or anything hidden, or
        anything the OS cannot look up."""
        if "\0" in path:
            raise ToolError(400, "a path cannot contain a NUL byte")
        if Path(path).is_absolute():
            raise ToolError(403, f"{path!r}: absolute paths are refused; give a path relative to the corpus root")
        try:
            target = (self.root / path).resolve()
            target.lstat()
        except (FileNotFoundError, NotADirectoryError):
            pass  # nothing there: list and cat answer 404
        except (OSError, RuntimeError) as e:  # a name too long, a symlink loop (RuntimeError before 3.13)
            raise ToolError(400, f"{path!r} cannot be looked up: {getattr(e, 'strerror', None) or e}") from None
        if not self._inside(target):
            raise ToolError(403, f"{path!r} is outside the corpus root")
        if _hidden(target.relative_to(self.root).parts):
            raise ToolError(404, f"no such file or directory: {path!r}")
        return target

    def _inside(self, resolved: Path) -> bool:
        return resolved == self.root or self.root in resolved.parents


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()
