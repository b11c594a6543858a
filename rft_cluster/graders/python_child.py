"""The child process of a python grader: limits its memory, blocks the network, then calls the
user's `grade(sample, item)`.

Started as a script (standard library only), it reads {"source", "sample", "item", "memory_mb"}
as JSON on stdin and writes one JSON object on stdout: {"score": number} or {"error": text}.

The network block replaces the socket constructors and name lookups with ones that raise. It
stops a grader from calling out by accident; it is a guard, not a security boundary (ctypes or a
subprocess can get around it). Run untrusted grader code in a container or VM.
"""

import json
import resource
import socket
import sys
import traceback

import _socket

ERROR_CHARS = 500  # keep the end of a traceback: that is where the cause is


def limit_memory(megabytes: int) -> None:
    limit = megabytes * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


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


def run(request: dict) -> dict:
    memory_mb = request["memory_mb"]
    limit_memory(memory_mb)
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
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return {"error": f"grade() returned {type(score).__name__} {repr(score)[:100]}, not a number"}
    return {"score": score}


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    result_stream = sys.stdout.buffer
    sys.stdout = sys.stderr  # the user's prints must not corrupt the result
    result_stream.write(json.dumps(run(request)).encode())
    result_stream.flush()


if __name__ == "__main__":
    main()
