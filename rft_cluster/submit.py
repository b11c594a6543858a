"""`rft-cluster submit|status|logs|stop`: a job on a running Ray cluster, through Ray's Jobs API.

`submit` validates the job here (its `${VAR}`s may be unset: they resolve on the cluster), stages
the job file, its datasets and a small local model directory into a temporary `working_dir`,
and submits `python -m rft_cluster.cli train job.yaml --output URI` — the same run that
`ray job submit --working-dir DIR -- rft-cluster train job.yaml` starts, since a Ray job's driver
connects to the cluster it runs in (driver.init_ray reads RAY_ADDRESS).

Secrets never travel in the submission: the staged job file keeps every `${VAR}` unexpanded,
and a header value that is not built from `${VAR}`s is refused. Only a variable named with
`--forward-env VAR` is sent, in the runtime_env's env_vars, which anyone who can read the
cluster's job list can see.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

from rft_cluster.config import JobSpec, load_job
from rft_cluster.dataset import validate_job_and_data
from rft_cluster.jobfile import ENV_REF, read_document

# A local model directory up to this size travels in the working_dir; a larger one must be a hub
# name or a path the cluster's nodes can read (the working_dir is held in the head's memory).
MODEL_STAGE_LIMIT = 100 * 2**20
# Ray refuses a working_dir package at or over this size (its gRPC message limit, 512 MiB). The
# staged files are measured unzipped: a conservative check, made before anything is uploaded.
WORKING_DIR_LIMIT = GCS_STORAGE_MAX_SIZE
STAGED_JOB = "job.yaml"


class SubmitError(Exception):
    """A submission that cannot go ahead; the message is one line (validation: one per problem)."""


def check(job_path: Path) -> JobSpec:
    """The job, validated as `rft-cluster validate` does except that unset `${VAR}`s are left
    for the cluster; header values must come from `${VAR}`s (else they would be submitted)."""
    problems = validate_job_and_data(job_path, unset_env_ok=True) or _literal_headers(job_path)
    if problems:
        raise SubmitError("\n".join(problems + [f"{len(problems)} problem(s) in {job_path}; nothing was submitted."]))
    return load_job(job_path, unset_env_ok=True)


def _literal_headers(job_path: Path) -> list[str]:
    doc = read_document(job_path)
    problems = []
    for path, value in _walk(doc.data, ()):
        if "headers" in path[:-1] and isinstance(value, str) and not ENV_REF.search(value):
            problems.append(
                f"{job_path}:{doc.line(path)}: {'.'.join(path)}: a literal header value would travel with the "
                "submission; write it as ${VAR} and set VAR in the cluster's environment (or --forward-env VAR)"
            )
    return problems


def _walk(node: Any, path: tuple[str, ...]):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, path + (str(k),))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (str(i),))
    else:
        yield path, node


def stage(job_path: Path, job: JobSpec, dest: Path, model_limit: int = MODEL_STAGE_LIMIT,
          working_dir_limit: int = WORKING_DIR_LIMIT) -> str:
    """Copies the job's datasets (and its model directory, when local and small enough) into
    `dest` and writes the job there with those paths made relative; returns the job's name."""
    raw = read_document(job_path).data
    for field in ("training_file", "validation_file"):
        value = getattr(job, field)
        if value:
            src = job.resolve_path(value)
            raw[field] = f"data/{field}{src.suffix}"
            (dest / "data").mkdir(exist_ok=True)
            shutil.copyfile(src, dest / raw[field])
    model = job.resolve_path(job.model)
    if model.is_dir():
        size = _size(model)
        if size > model_limit:
            raise SubmitError(
                f"model directory {model} is {_mib(size)}, over the {_mib(model_limit)} that travel with a submission; "
                "use a hub name or a path every node of the cluster can read"
            )
        shutil.copytree(model, dest / "model")
        raw["model"] = "model"
    (dest / STAGED_JOB).write_text(yaml.safe_dump(raw, sort_keys=False))
    size = _size(dest)
    if size >= working_dir_limit:
        raise SubmitError(
            f"the staged working_dir (job, datasets, model) is {_mib(size)}, over Ray's {_mib(working_dir_limit)} "
            "package limit; put the datasets or the model where the cluster can read them"
        )
    return STAGED_JOB


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@contextmanager
def jobs_api(address: str) -> Iterator[Any]:
    """A JobSubmissionClient for `address`, its errors turned into one-line SubmitErrors.

    With token authentication (Ray 2.60's default) the token comes from RAY_AUTH_TOKEN, the file
    RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token; as `ray start` does, a token that is present
    turns token mode on when RAY_AUTH_MODE is unset."""
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if AUTH_MODE_ENV_VAR not in os.environ and AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()
    try:
        yield JobSubmissionClient(address)
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(e)}") from None
    except AuthenticationError as e:
        raise SubmitError(
            f"{address}: {_first_line(e)} (the cluster's token goes in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        ) from None
    except RuntimeError as e:  # the Jobs API's HTTP errors, e.g. 404 for an unknown submission id
        raise SubmitError(f"{address}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def submit(job_path: Path, address: str, output: str | None = None, forward_env: list[str] = (),
           model_limit: int = MODEL_STAGE_LIMIT, working_dir_limit: int = WORKING_DIR_LIMIT) -> str:
    """Validates, stages and submits a job; returns its submission id."""
    job = check(job_path)
    target = output or job.storage
    if not target or ("://" not in target and not Path(target).is_absolute()):
        raise SubmitError(
            "--output (or the job's storage) must be a URI such as s3://bucket/run or an absolute path on the cluster, "
            f"got {job.redactor.text(repr(target))}"
        )
    missing = [v for v in forward_env if v not in os.environ]
    if missing:
        raise SubmitError(f"--forward-env: {', '.join(missing)} not set here")
    with tempfile.TemporaryDirectory(prefix="rft-submit-") as workdir:
        name = stage(job_path, job, Path(workdir), model_limit, working_dir_limit)
        runtime_env: dict[str, Any] = {"working_dir": workdir}
        if forward_env:
            runtime_env["env_vars"] = {v: os.environ[v] for v in forward_env}
        # The job's own storage travels as written, in the staged job (its `${VAR}`s resolve on the
        # cluster): the entrypoint, visible in the job list, names only an explicit --output.
        entrypoint = f"python -m rft_cluster.cli train {shlex.quote(name)}" + (f" --output {shlex.quote(output)}" if output else "")
        with jobs_api(address) as jobs:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"rft_job": job_path.name})


def follow(address: str, submission_id: str) -> int:
    """Streams the job's logs to stdout until it ends, then prints its status; 0 only when it SUCCEEDED."""
    with jobs_api(address) as jobs:

        async def tail() -> None:
            async for chunk in jobs.tail_job_logs(submission_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        asyncio.run(tail())
        return _report(jobs, submission_id)


def status(address: str, submission_id: str) -> str:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message about it."""
    with jobs_api(address) as jobs:
        return _status_line(jobs.get_job_info(submission_id))


def _report(jobs: Any, submission_id: str) -> int:
    info = jobs.get_job_info(submission_id)
    print(f"{submission_id}: {_status_line(info)}")
    return 0 if info.status.value == "SUCCEEDED" else 1


def _status_line(info: Any) -> str:
    # A failed job's message goes on with its last logs, which the caller has seen or can fetch.
    return info.status.value + (f" ({info.message.strip().splitlines()[0]})" if info.message else "")


def logs(address: str, submission_id: str) -> str:
    with jobs_api(address) as jobs:
        return jobs.get_job_logs(submission_id)


def stop(address: str, submission_id: str) -> bool:
    """Asks the cluster to stop the job; False when it had already ended."""
    with jobs_api(address) as jobs:
        return jobs.stop_job(submission_id)
