"""`rft-cluster` command line: validate, train, demo, submit/status/logs/stop, tool-run, grader-run,
sft, k8s, make-tiny-model, precheck, docs. One `_add_<command>` function builds each command's
arguments; one `_<command>` handler runs it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rft_cluster.families import FAMILIES
from rft_cluster.tiny_model import PRETRAIN_STEPS  # a light import: the module loads torch only when building

DEFAULT_JOB = Path(__file__).resolve().parents[1] / "cluster_configs" / "local.yaml"


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _check(job_path: Path, output: str | None = None) -> list[str]:
    """Prints the job's problems and warnings (one line each) to stderr; returns the problems.
    `output`: `train --output`, whose storage is built too."""
    from rft_cluster.dataset import check_job_and_data

    problems, warnings = check_job_and_data(job_path, output=output)
    for line in problems + warnings:
        print(line, file=sys.stderr)
    return problems


def _validate(args: argparse.Namespace) -> int:
    from rft_cluster.grader_actor import deadlines

    problems = _check(Path(args.job))
    if problems:
        print(f"{len(problems)} problem(s) found; nothing was started.", file=sys.stderr)
        return 1
    job = _load(Path(args.job))
    for deadline in deadlines(job.rl):  # what the run enforces, stated (preflight refused any that cannot fit)
        print(job.redactor.text(deadline.line()))
    print(f"{args.job}: job and datasets are valid.")
    return 0


def _load_or_exit(job_path: Path, output: str | None = None):
    problems = _check(job_path, output)
    if problems:
        sys.exit(f"{len(problems)} problem(s) in {job_path}; fix them first (see `rft-cluster validate`).")
    return _load(job_path)


def _load(job_path: Path):
    """The job `_check` found no problem in."""
    from rft_cluster.config import SpecError, load_job

    try:
        return load_job(job_path)
    except SpecError as e:  # checked already; kept for a file changed in between
        sys.exit(str(e))


def _train(args: argparse.Namespace) -> int:
    from rft_cluster.driver import train
    from rft_cluster.placement import PlacementError

    job = _load_or_exit(Path(args.job), args.output)  # before any actor starts
    try:
        result = train(job, args.output, max_steps=args.max_steps, resume=args.resume, verbose=args.verbose)
    except PlacementError as e:
        sys.exit(str(e))
    print(f"done: {result['steps']} steps; outputs in {result['output']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The embedded default: the FinQA demo from nothing to a report (rft_cluster.demo)."""
    from rft_cluster.demo import run_demo

    run_demo(Path(args.job), Path(args.output), seed=args.seed, max_steps=args.max_steps, tool_delay_s=args.tool_delay_ms / 1000,
             verbose=args.verbose)
    return 0


def _tool_run(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from rft_cluster.tryout import tool_run

    result = asyncio.run(tool_run(_load_or_exit(Path(args.job)), args.tool, args.arguments, args.row, Console()))
    return 0 if result.status.value == "ok" else 1


def _grader_run(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from rft_cluster.graders.sandbox import SandboxUnavailable
    from rft_cluster.tryout import grader_run

    try:
        result = asyncio.run(grader_run(_load_or_exit(Path(args.job)), args.output_text, args.row, Console()))
    except SandboxUnavailable as e:  # a python grader on a machine without namespaces
        sys.exit(str(e))
    return 0 if result.score is not None else 1


def _sft(args: argparse.Namespace) -> int:
    from rft_cluster.sft import sft

    result = sft(args.model, Path(args.demonstrations), Path(args.output), epochs=args.epochs, learning_rate=args.learning_rate)
    print(f"loss {result['first_epoch_loss']:.4f} -> {result['last_epoch_loss']:.4f}")
    return 0


def _k8s(args: argparse.Namespace) -> int:
    """KubeRay manifests for a job (rft_cluster.k8s): to stdout, or files under --output."""
    from rft_cluster.config import SpecError
    from rft_cluster.k8s import K8sError, K8sOptions, render

    options = K8sOptions(args.name, args.namespace, args.image, args.secret, args.storage, args.min_rollout_replicas, args.max_rollout_replicas)
    try:
        manifests = render(Path(args.job), options)
    except (SpecError, K8sError) as e:
        print(e, file=sys.stderr)
        return 1
    if args.image is None:
        print(f"note: {manifests.image} has no rft-cluster installed; build an image with it and pass --image (docs/deploy.md: Run on Kubernetes)", file=sys.stderr)
    if args.output:
        for path in manifests.write(Path(args.output)):
            print(path)
    else:
        print(manifests.to_yaml(), end="")
    return 0


def _jobs_api(args: argparse.Namespace) -> int:
    """submit / status / logs / stop: a job on a running Ray cluster (rft_cluster.submit)."""
    from rft_cluster import submit

    try:
        if args.command == "submit":
            submission_id = submit.submit(Path(args.job), args.address, args.output, args.forward_env)
            print(submission_id, flush=True)
            return submit.follow(args.address, submission_id) if args.follow else 0
        if args.command == "status":
            print(f"{args.submission_id}: {submit.status(args.address, args.submission_id)}")
        elif args.command == "logs":
            if args.follow:
                return submit.follow(args.address, args.submission_id)
            print(submit.logs(args.address, args.submission_id), end="")
        else:
            stopped = submit.stop(args.address, args.submission_id)
            print(f"{args.submission_id}: {'stop requested' if stopped else 'had already ended'}")
        return 0
    except submit.SubmitError as e:
        print(e, file=sys.stderr)
        return 1


def _make_tiny_model(args: argparse.Namespace) -> int:
    from rft_cluster.tiny_model import make_tiny_model

    try:
        path = make_tiny_model(args.dir, seed=args.seed, corpus=args.corpus, pretrain_steps=args.pretrain_steps, family=args.family)
    except ValueError as e:
        sys.exit(str(e))
    print(f"tiny model written to {path}")
    return 0


def _precheck(args: argparse.Namespace) -> int:
    """Samples the job's prompts on its current model and says whether RL has a signal to learn from."""
    import json

    from rft_cluster.placement import PlacementError
    from rft_cluster.precheck import format_report, precheck

    job = _load_or_exit(Path(args.job))
    try:
        report = precheck(job, args.samples, args.split, verbose=args.verbose)
    except PlacementError as e:
        sys.exit(str(e))
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["verdict"]["ok"] else 1


def _docs(args: argparse.Namespace) -> int:
    """Writes the job reference rendered from the job models; with --check, exits 1 if the file differs."""
    from rft_cluster.reference import render_reference

    page, path = render_reference(), Path(args.output)
    if args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != page:
            print(f"{path} differs from the job models in rft_cluster/config.py: run `rft-cluster docs` to regenerate it", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    print(f"job reference written to {path}")
    return 0


_VERBOSE = "show the engines' and libraries' log lines here too (default: only in the run's log files)"


def _add_validate(sub: Any) -> None:
    p = sub.add_parser("validate", help="check a job file and its datasets; start nothing")
    p.add_argument("job")
    p.set_defaults(fn=_validate)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="run agent RFT for a job")
    p.add_argument("job")
    p.add_argument("--output", default=None, help="where everything is written: a local path or a pyarrow.fs URI "
                   "(s3://, gs://, hdfs://, file://); default: the job's `storage`, else runs/train")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE)
    p.set_defaults(fn=_train)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the embedded default end to end: FinQA environment, tiny model, warm start, agent RFT, report")
    p.add_argument("job", nargs="?", default=str(DEFAULT_JOB))
    p.add_argument("--output", default="runs/local", help="where everything is written (a local directory)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--seed", type=int, default=None, help="RL seed (default: the job's); the warm start is shared")
    p.add_argument("--tool-delay-ms", type=_non_negative, default=0,
                   help="delay every tool call the demo's server answers by this many ms (the regime of real tools)")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE)
    p.set_defaults(fn=_demo)


def _add_jobs_api(sub: Any) -> None:
    address = {"required": True, "help": "the cluster's Jobs API (its dashboard), e.g. http://HEAD:8265"}
    p = sub.add_parser("submit", help="submit a job to a running Ray cluster (Ray's Jobs API)")
    p.add_argument("job")
    p.add_argument("--address", **address)
    p.add_argument("--output", default=None, help="where the run writes: a URI (s3://...) or an absolute path on the cluster; default: the job's storage")
    p.add_argument("--follow", action="store_true", help="stream the logs; exit with the job's status (0 only on SUCCEEDED)")
    p.add_argument("--forward-env", action="append", default=[], metavar="VAR",
                   help="send this variable's value with the job (visible to anyone who can list the cluster's jobs)")
    p.set_defaults(fn=_jobs_api)
    for name, helptext in (("status", "a submitted job's status"), ("logs", "a submitted job's logs"), ("stop", "stop a submitted job")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("submission_id")
        p.add_argument("--address", **address)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
        p.set_defaults(fn=_jobs_api)


def _add_tryout(sub: Any) -> None:
    p = sub.add_parser("tool-run", help="send one tool call exactly as training would, and show what the model sees")
    p.add_argument("job")
    p.add_argument("--tool", required=True, help="tool name, as declared in the job")
    p.add_argument("--arguments", default="{}", help="the call's arguments, a JSON object as a string")
    p.add_argument("--row", type=int, default=0, help="training row whose reference data is sent as `item`")
    p.set_defaults(fn=_tool_run)
    p = sub.add_parser("grader-run", help="grade one answer exactly as training would, and show the reward")
    p.add_argument("job")
    p.add_argument("--output-text", required=True, help="the model's final answer to grade")
    p.add_argument("--row", type=int, default=0, help="training row whose reference data is sent as `item`")
    p.set_defaults(fn=_grader_run)


def _add_sft(sub: Any) -> None:
    p = sub.add_parser("sft", help="supervised warm start on demonstration conversations (JSONL)")
    p.add_argument("model", help="HF model directory or hub name")
    p.add_argument("demonstrations", help="JSONL of OpenAI-format conversations with tool calls")
    p.add_argument("--output", required=True, help="where the fine-tuned HF model directory goes")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.set_defaults(fn=_sft)


def _add_k8s(sub: Any) -> None:
    p = sub.add_parser("k8s", help="KubeRay RayCluster + RayJob manifests whose resources match the job's `cluster` section")
    p.add_argument("job")
    p.add_argument("--output", default=None, metavar="DIR", help="write one file per object here (default: one YAML stream to stdout)")
    p.add_argument("--image", default=None, help="a Ray image with rft-cluster installed (default: the plain Ray image, which lacks it)")
    p.add_argument("--name", default=None, help="RayCluster/RayJob name (default: from the job file's name)")
    p.add_argument("--namespace", default=None, help="default: kubectl's current namespace")
    p.add_argument("--secret", default="rft-cluster-env", help="the Kubernetes Secret whose keys become the pods' environment")
    p.add_argument("--storage", default=None, metavar="URI", help="where the run writes (s3://, gs://, ...); default: the job's storage")
    p.add_argument("--min-rollout-replicas", type=int, default=None, metavar="N", help="autoscaling floor of the rollout group (default: cluster.rollout_workers)")
    p.add_argument("--max-rollout-replicas", type=int, default=None, metavar="N", help="autoscaling ceiling of the rollout group (default: cluster.rollout_workers)")
    p.set_defaults(fn=_k8s)


def _add_make_tiny_model(sub: Any) -> None:
    p = sub.add_parser("make-tiny-model", help="build a small Qwen2-style model + tokenizer offline, fitted to your material")
    p.add_argument("dir")
    p.add_argument("--corpus", nargs="+", default=[], metavar="FILE",
                   help="what the tokenizer and the pre-training learn the domain from: the job's datasets and demonstrations "
                        "(JSONL, rendered as the model will see them, tool outputs included) and any text files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=_non_negative, default=PRETRAIN_STEPS, help="pre-training steps (0: random weights)")
    p.add_argument("--family", choices=list(FAMILIES), default="hermes",
                   help="the chat and tool-call format (default hermes): "
                        + "; ".join(f"{f.name}: {f.description}" for f in FAMILIES.values()))
    p.set_defaults(fn=_make_tiny_model)


def _add_precheck(sub: Any) -> None:
    p = sub.add_parser("precheck", help="sample the job's prompts on its current model and say whether RL has a signal to learn from")
    p.add_argument("job")
    p.add_argument("--samples", type=int, default=32, metavar="K",
                   help="rollouts in all: K / group_size prompts, group_size rollouts each (default 32)")
    p.add_argument("--split", choices=("valid", "train"), default="valid", help="which prompts (default: validation, else training)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures and the verdict here")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE)
    p.set_defaults(fn=_precheck)


def _add_docs(sub: Any) -> None:
    p = sub.add_parser("docs", help="write the job reference (every job field, its default, range and meaning) from the code")
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "job-reference.md"), metavar="PATH",
                   help="where to write it (default: docs/job-reference.md in this repository)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs from a fresh render")
    p.set_defaults(fn=_docs)


COMMANDS = (_add_validate, _add_train, _add_demo, _add_jobs_api, _add_tryout, _add_sft, _add_k8s,
            _add_make_tiny_model, _add_precheck, _add_docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rft-cluster", description="Agent reinforcement fine-tuning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":  # vLLM spawns processes: keep entry points importable without side effects
    sys.exit(main())
