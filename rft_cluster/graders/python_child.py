"""The child process of a python grader: enters the sandbox (`sandbox.py`), then calls the
user's `grade(sample, item)`.

Started as a script (standard library only), it reads {"source", "sample", "item", "memory_mb",
"cpu_s", "sandbox"} as JSON on stdin and writes one JSON object on stdout: {"score": number},
{"error": text}, or {"unavailable": text} when the machine cannot provide the sandbox.

The sandbox is the security boundary. The socket guard below only turns a grader's attempt to
use the network into a clear error instead of "Network is unreachable".
"""

import importlib.util
import json
import numbers
import os
import resource
import socket
import sys
import traceback

import _socket

ERROR_CHARS = 500  # keep the end of a traceback: that is where the cause is


def load_sandbox():
    # `python -I` puts no script directory on sys.path, and the user's code must not import it.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox.py")
    spec = importlib.util.spec_from_file_location("rft_grader_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BlockedSocket(socket.socket):
    # A subclass, not a function, so modules that subclass socket.socket (ssl) still import.
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in python graders")


def refuse(*args, **kwargs):
    raise PermissionError("network access is disabled in python graders")


def block_network() -> None:
    for module in (socket, _socket):
        module.socket = BlockedSocket
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def confine(request: dict) -> dict | None:
    """Enters the sandbox (or only limits memory, where the operator opted out); an error result
    if the machine cannot provide it."""
    if not request["sandbox"]:
        limit = request["memory_mb"] * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return None
    sandbox = load_sandbox()
    try:
        sandbox.enter(request["memory_mb"], request["cpu_s"])
    except sandbox.SandboxUnavailable as e:
        return {"unavailable": str(e)}
    return None


def run(request: dict) -> dict:
    memory_mb = request["memory_mb"]
    block_network()
    try:
        namespace = {"__name__": "grader"}
        exec(compile(request["source"], "<grader source>", "exec"), namespace)
        score = namespace["grade"](request["sample"], request["item"])
    except MemoryError:
        return {"error": f"grade() exceeded the memory limit of memory_mb={memory_mb}"}
    except BaseException as e:  # SystemExit too: any way out of grade() but a return is a failure
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
        return {"error": "grade() raised: " + (text[-ERROR_CHARS:] if len(text) > ERROR_CHARS else text)}
    # numbers.Real: numpy's scalars too (float32 is no float), but not bool (numpy's bool_ is no Real).
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        return {"error": f"grade() returned {type(score).__name__} {_safe_repr(score)}, not a number"}
    try:
        return {"score": float(score)}  # a float: JSON can carry it (a 5,000-digit int it cannot)
    except Exception:  # noqa: BLE001 - OverflowError for 10**5000; whatever a Real's own __float__ raises
        return {"error": f"grade() returned {type(score).__name__} {_safe_repr(score)} beyond a float's range, not a finite number"}


def _safe_repr(value: object) -> str:
    """The start of `value`'s repr, or a stand-in when it cannot be had: the repr of a list holding
    10**5000 raises, and the result must still reach the parent."""
    try:
        return repr(value)[:100]
    except Exception:  # noqa: BLE001 - the user's __repr__ may raise anything
        return "(no repr)"


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    result_stream = sys.stdout.buffer
    sys.stdout = sys.stderr  # the user's prints must not corrupt the result
    result = confine(request) or run(request)
    result_stream.write(json.dumps(result).encode())
    result_stream.flush()


if __name__ == "__main__":
    main()
