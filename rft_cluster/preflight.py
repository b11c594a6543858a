"""What `train` builds before its first actor starts, built by `validate` (and by `train` before
any actor) without starting it, so a job that validates is a run that starts: the model's config
and tokenizer (a local directory), its chat template rendered on each dataset's first row, the
run's storage filesystem, the W&B settings, the job as the JSON the run records, the HTTP
request to every tool, grader and judge endpoint (built, never sent), and the deadline of every
tool call and grade (each must fit its own schedule). Each failure is one located line; nothing
here writes, connects or uploads.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from rft_cluster.config import (
    ENV_REF,
    EndpointGrader,
    JobSpec,
    MultiGrader,
    ScoreModelGrader,
)

# A hub name is `name` or `owner/name`; anything else that does not exist is a missing directory.
_HUB_NAME_PARTS = 2


def preflight_problems(job: JobSpec, first_rows: list[tuple[Path, dict[str, Any]]], output: str | Path | None = None) -> list[str]:
    """Every failure of building what `train` builds; `first_rows`: (dataset, its first row, text
    parts joined) of each dataset, `output`: `train --output` (default: the job's storage)."""
    return (_model_problems(job, first_rows) + _storage_problems(job, output) + _wandb_problems(job) + _record_problems(job)
            + _request_problems(job) + _deadline_problems(job))


def _model_problems(job: JobSpec, rows: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    where, path = job.locate("model"), job.resolve_path(job.model)
    try:
        os.stat(path)
    except FileNotFoundError:
        parts = job.model.split("/")
        # A hub name is left to the engines; a path-like name, or one under a directory that exists here, is a missing directory.
        if len(parts) <= _HUB_NAME_PARTS and not job.model.startswith((".", "~")) and all(parts) and not job.resolve_path(parts[0]).is_dir():
            return []
        return [f"{where}: {path}: no such model directory"]
    except OSError as e:  # a symlink loop, no permission
        return [f"{where}: {path}: cannot read: {e.strerror}"]
    if not path.is_dir():
        return [f"{where}: {path} is a file: a model is a directory (config.json, tokenizer, weights)"]
    if not any(path.iterdir()):
        return [f"{where}: {path} is an empty directory: a model is config.json, a tokenizer and weights"]
    from transformers import AutoConfig

    from rft_cluster.chat import ChatCodec, TemplateError

    try:
        AutoConfig.from_pretrained(path)
        codec = ChatCodec.for_model(str(path))
    except TemplateError as e:  # the codec renders a one-message chat to learn the template's shape
        return [f"{where}: the chat template cannot render a one-message chat: {_first_line(e)}"]
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError... for a broken directory
        return [f"{where}: {path} is not a model transformers can load: {type(e).__name__}: {_first_line(e)}"]
    effort = job.rl.hyperparameters.reasoning_effort
    variables = {} if effort == "default" else {"reasoning_effort": effort}
    problems = []
    for dataset, row in rows:
        try:
            codec.prompt_ids(row["messages"], row.get("tools"), **variables)
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception() included
            problems.append(f"{where}: the chat template cannot render the first row of {dataset}: {_first_line(e)}")
    return problems


def _storage_problems(job: JobSpec, output: str | Path | None) -> list[str]:
    from rft_cluster.storage import RunStorage

    uri = output if output is not None else job.storage
    if uri is None:
        return []
    uri = str(uri)
    where = job.locate("storage") if output is None else f"--output {uri}"
    if "://" not in uri:
        return []  # a local directory: created by the run
    parts = urlsplit(uri)
    if parts.scheme == "s3" and "region" not in dict(parse_qsl(parts.query)):
        # Without a region pyarrow asks S3 for the bucket's (a network call): built here with a
        # placeholder region, which is all the filesystem's construction depends on.
        uri = urlunsplit(parts._replace(query=urlencode([*parse_qsl(parts.query), ("region", "us-east-1")])))
    try:
        RunStorage(uri)
    except Exception as e:  # noqa: BLE001 - pyarrow: ArrowInvalid for an unknown scheme, OSError for a missing driver
        return [f"{where}: pyarrow cannot open this storage: {type(e).__name__}: {_first_line(e)}"]
    return []


def _wandb_problems(job: JobSpec) -> list[str]:
    if job.wandb.mode == "disabled":
        return []
    import wandb

    try:
        wandb.Settings(mode=job.wandb.mode, project=job.wandb.project, run_name=job.suffix or "rft")
    except Exception as e:  # noqa: BLE001 - wandb's UsageError, pydantic's ValidationError
        return [f"{job.locate('wandb', 'project')}: W&B refuses these settings: {_first_line(e)}"]
    return []


def _record_problems(job: JobSpec) -> list[str]:
    """The run records the job as strict JSON (its config, W&B's config)."""
    try:
        json.dumps(job.model_dump(mode="json"), allow_nan=False)
    except (ValueError, TypeError) as e:
        return [f"{job.source_path}:1: <root>: the job cannot be recorded as JSON: {_first_line(e)}"]
    return []


def _endpoints(job: JobSpec) -> list[tuple[tuple[str, ...], str, dict[str, str]]]:
    """(key path of the URL, URL as requested, headers) of every endpoint the run calls."""
    found = [(("method", "reinforcement", "tools", str(i), "server_url"), t.server_url, t.headers) for i, t in enumerate(job.rl.tools)]
    stack: list[tuple[tuple[str, ...], Any]] = [(("method", "reinforcement", "grader"), job.rl.grader)]
    while stack:
        path, grader = stack.pop()
        if isinstance(grader, MultiGrader):
            stack += [(path + ("graders", name), sub) for name, sub in grader.graders.items()]
        elif isinstance(grader, EndpointGrader):
            found.append((path + ("url",), grader.url, grader.headers))
        elif isinstance(grader, ScoreModelGrader):
            found.append((path + ("base_url",), grader.base_url.rstrip("/") + "/chat/completions", grader.headers))
    return [(p, url, headers) for p, url, headers in found if not ENV_REF.search(url + "".join(headers.values()))]  # set on the cluster


def _request_problems(job: JobSpec) -> list[str]:
    from rft_cluster.http import request_problem

    endpoints = _endpoints(job)
    if not endpoints:
        return []

    async def build_all() -> list[str | None]:
        return [await request_problem(url, headers) for _, url, headers in endpoints]

    # In a thread: the caller may be inside an event loop (an async test, a notebook).
    with ThreadPoolExecutor(1) as pool:
        problems = pool.submit(asyncio.run, build_all()).result()
    return [f"{job.locate(*path)}: {problem}" for (path, _, _), problem in zip(endpoints, problems) if problem]


def _deadline_problems(job: JobSpec) -> list[str]:
    """A tool call or grade whose own schedule outlasts its deadline would be cut short mid-way,
    every time it runs that long: the job must shorten one or lengthen the other."""
    from rft_cluster.grader_actor import deadlines

    return [f"{job.locate('method', 'reinforcement', *d.at)}: {d.what}: its own worst case {d.worst_case_s:g} s is longer than its "
            f"deadline, rollout_timeout_s {d.enforced_s:g} s: shorten it or raise tool_settings.rollout_timeout_s"
            for d in deadlines(job.rl) if not d.fits and d.at is not None]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
