"""Confines the calling process before it runs a python grader's code, with what Linux provides.

`enter(memory_mb, cpu_s)` forks. The caller stays on the host, waits for its child and exits with the
child's status; the child returns from `enter` as process 1 of new PID, network, mount, IPC and
UTS namespaces, and then:

- sees a read-only filesystem holding only /usr, /bin, /lib*, /etc/ld.so.cache and the Python
  install (prefixes of the running interpreter), a few /dev nodes, its own /proc (its own
  processes only) and a private tmpfs /tmp (its cwd), limited in size;
- has no network (a new network namespace has only a loopback, which is down);
- runs as an unprivileged uid with no capabilities and `no_new_privs` (setuid binaries grant
  nothing): as root, a uid of its own (`UID_BASE` + the waiting process's pid); otherwise (or
  as root without CAP_SYS_ADMIN), in a new user namespace, uid 65534 mapped onto the caller's uid;
- has rlimits on memory (address space), CPU time, processes, open files and file size;
- takes every process it started with it: when process 1 of a PID namespace exits, the kernel
  kills the rest, so `setsid` children cannot outlive the grade; and when the waiting process is
  killed (the grader's timeout, or its output cap), process 1 gets SIGKILL (`PR_SET_PDEATHSIG`).

Standard library only: `python_child.py` loads this file by path inside `python -I`, and the
parent (`python.py`) imports it for the names below.
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
import sys

# An operator's explicit opt-out for machines that cannot provide namespaces (python.py logs it).
UNSANDBOXED_ENV = "RFT_PYTHON_GRADER_UNSANDBOXED"
UID_BASE = 1 << 30  # above any uid a distribution allocates; + a pid makes it unique per grade
USERNS_UID = 65534  # "nobody" inside a user namespace

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Directories shared read-only (where they exist); symlinks (/bin -> usr/bin) are recreated.
SYSTEM_PATHS = ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache")
DEVICES = ("null", "zero", "full", "random", "urandom")
# The new root is built on a tmpfs mounted over /sys in the private mount namespace: a directory
# every Linux system has and that none of the shared paths lives under.
STAGING = "/sys"
PROCESSES, OPEN_FILES = 16, 64  # processes (threads count too): each may use memory_mb
TMP_MB = 64  # the size of /tmp, and of any one file written


class SandboxUnavailable(RuntimeError):
    """The machine cannot provide a mechanism the sandbox needs; the message names it."""


_libc = ctypes.CDLL(None, use_errno=True)


def _call(what: str, result: int) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SandboxUnavailable(f"{what} failed: {os.strerror(errno)} (errno {errno})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    _call(f"mount {target}", _libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)))


def _setuid_mode() -> bool:
    """Root whose own uid range maps the sandbox's uid (not root of a rootless container)."""
    if os.geteuid() != 0:
        return False
    with open("/proc/self/uid_map") as f:
        ranges = [tuple(map(int, line.split())) for line in f]
    uid = UID_BASE + 4 * 1024 * 1024  # the largest pid_max
    return any(inside == outside == 0 and uid < count for inside, outside, count in ranges)


def _map_user(outer_uid: int, outer_gid: int) -> None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"{USERNS_UID} {outer_uid} 1"), ("gid_map", f"{USERNS_UID} {outer_gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _bind_read_only(source: str, target: str, extra_flags: int = MS_NODEV) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND)
    # A remount must keep the source's locked flags (noexec...), or a user namespace refuses it;
    # statvfs's ST_* flags have the values of the MS_* ones.
    kept = os.statvfs(source).f_flag & (MS_NOEXEC | 1024 | 2048 | 4096)  # noatime, nodiratime, relatime
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | extra_flags | kept)


def _shared_paths() -> list[str]:
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    paths = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    for prefix in sorted(prefixes):  # sorted: a parent comes before what it holds
        if not any(prefix == p or prefix.startswith(p.rstrip("/") + "/") for p in paths):
            paths.append(prefix)
    return paths


def _build_root() -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    _mount("sandbox", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    # /tmp first: a Python install under /tmp (a CI's venv) is then shared inside it, not hidden.
    os.makedirs(STAGING + "/tmp")
    _mount("tmp", STAGING + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={TMP_MB}m,nr_inodes=4096,mode=1777")
    for path in _shared_paths():
        target = STAGING + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        else:
            _bind_read_only(path, target)
    for device in DEVICES:
        _bind_read_only(f"/dev/{device}", f"{STAGING}/dev/{device}", extra_flags=MS_NOEXEC)
    os.makedirs(STAGING + "/proc")
    _mount("proc", STAGING + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(None, STAGING, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(STAGING)  # no way back out: the capability to chroot again is dropped below
    os.chdir("/tmp")


def _limit(memory_mb: int, cpu_s: int) -> None:
    mb = 1024 * 1024
    for which, value in (
        (resource.RLIMIT_AS, memory_mb * mb),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_NPROC, PROCESSES),
        (resource.RLIMIT_NOFILE, OPEN_FILES),
        (resource.RLIMIT_FSIZE, TMP_MB * mb),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def _drop_privileges(uid: int | None) -> None:
    if uid is not None:  # root on the host: setuid to a non-zero uid clears every capability
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    # In a user namespace the process keeps its capabilities there until told otherwise.
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    _call("capset", _libc.capset(header, (ctypes.c_uint32 * 6)()))
    _call("prctl(PR_SET_NO_NEW_PRIVS)", _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def _wait_and_exit(pid: int) -> None:
    """The host side: waits for process 1 and exits with its status (128 + signal if killed).
    Its end of the `alive` pipe stays open until it exits."""
    os.close(0)
    os.close(1)  # the result pipe's end is then held only inside the sandbox
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _unshare() -> bool:
    """New namespaces for the process forked next; True if as root on the host (setuid mode),
    False if in a user namespace (also root's fallback where it lacks CAP_SYS_ADMIN)."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if _setuid_mode() and _libc.unshare(flags) == 0:
        return True
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    try:
        _call("unshare(user, pid, net, mount namespaces)", _libc.unshare(flags | CLONE_NEWUSER))
    except SandboxUnavailable as e:
        needs = "user namespaces (sysctl user.max_user_namespaces > 0, no seccomp/AppArmor block) or root with CAP_SYS_ADMIN"
        raise SandboxUnavailable(f"python grader sandbox: {e}; this machine must allow {needs}") from None
    _map_user(outer_uid, outer_gid)
    return False


def enter(memory_mb: int, cpu_s: int) -> None:
    """Returns in the confined child; the calling process never returns (see the module doc).
    `memory_mb`: address space of each process; `cpu_s`: CPU time of each process, a backstop to
    the caller's wall-time limit."""
    setuid_mode = _unshare()
    launcher = os.getpid()
    alive_read, alive_write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(alive_read)
        _wait_and_exit(pid)
    os.close(alive_write)
    os.setsid()  # out of the host's process group: kill(0, ...) reaches only the sandbox
    try:
        _build_root()
        _limit(memory_mb, cpu_s)
        _drop_privileges(UID_BASE + launcher if setuid_mode else None)
        # After the uid change, which clears it.
        _call("prctl(PR_SET_PDEATHSIG)", _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
    except (SandboxUnavailable, OSError) as e:
        raise SandboxUnavailable(f"python grader sandbox: {e}") from None
    if select.select([alive_read], [], [], 0)[0]:  # the waiting process died before the line above
        os._exit(128 + signal.SIGKILL)
    os.close(alive_read)
