"""The first program inside a sandbox: limits, privileges and filter, then the tool.

It runs as ``python -I -S -B -c <this file> <config JSON>`` inside the sandbox's namespaces, so
it imports only the standard library. It drops to the call's own uid (when started as root),
installs the seccomp filter itself when bubblewrap did not, forks the tool with its resource
limits, waits for it, kills every process the tool left in the sandbox's PID namespace, and
writes a JSON report (exit status, CPU time, peak memory, processes killed) to the report pipe.

Modes: ``snippet`` reads ``{"code": ..., "arguments": ...}`` from standard input and runs the
code with ``arguments`` bound; ``exec`` replaces the tool process with ``argv``.
"""

import json
import os
import resource
import signal
import sys


def _seccomp(program: bytes) -> None:
    import ctypes  # imported (and cached) before the uid switch, see main()

    libc = ctypes.CDLL(None, use_errno=True)

    class Fprog(ctypes.Structure):  # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffer = ctypes.create_string_buffer(program, len(program))
    prog = Fprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "no_new_privs")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "seccomp")


def _limits(limits: "dict[str, float]") -> None:
    pairs = (
        (resource.RLIMIT_AS, "memory_bytes"),
        (resource.RLIMIT_NOFILE, "open_files"),
        (resource.RLIMIT_FSIZE, "file_size_bytes"),
        (resource.RLIMIT_NPROC, "processes"),
        (resource.RLIMIT_CORE, "core"),
    )
    for which, name in pairs:
        value = int(limits.get(name, 0))
        resource.setrlimit(which, (value, value))
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(limits["cpu_seconds"] + used.ru_utime + used.ru_stime) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _leftovers() -> "list[int]":
    """Processes other than this one and PID 1 in the sandbox's PID namespace."""
    me = os.getpid()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (1, me):
            found.append(int(entry))
    return found


def main() -> None:
    config = json.loads(sys.argv[1])
    report = os.fdopen(config["report_fd"], "w") if config.get("report_fd") is not None else None
    uid = config.get("uid")
    if config.get("seccomp"):
        # Load ctypes while still able to read the interpreter's library, which the call's
        # uid may not be (a root-owned prefix in the process sandbox).
        import ctypes  # noqa: F401
    if config.get("work_dir") and uid is not None:
        os.chown(config["work_dir"], uid, uid)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if config.get("seccomp"):
        _seccomp(bytes.fromhex(config["seccomp"]))
    if config.get("work_dir"):
        os.chdir(config["work_dir"])
    payload = sys.stdin.buffer.read() if config["mode"] == "snippet" else b""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if report is not None:
                report.close()
            _limits(config["limits"])
            if config["mode"] == "exec":
                argv = config["argv"]
                os.execvpe(argv[0], argv, config["env"])
            request = json.loads(payload)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            sys.argv = ["<tool>"]
            scope = {"__name__": "__main__", "arguments": request.get("arguments", {})}
            exec(compile(request["code"], "<tool>", "exec"), scope)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        except SystemExit as exit:
            code = exit.code
            sys.stdout.flush()
            os._exit(code if isinstance(code, int) else (0 if code is None else 1))
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    _, status, usage = os.wait4(pid, 0)
    killed: set[int] = set()
    if config.get("own_pid_namespace"):
        # Bounded: a fork bomb's survivors may fork while the sweep runs.
        for _ in range(100):
            leftovers = [p for p in _leftovers() if p not in killed]
            if not leftovers:
                break
            for other in leftovers:
                try:
                    os.kill(other, signal.SIGKILL)
                    killed.add(other)
                except OSError:
                    pass
    result = {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "max_rss_bytes": usage.ru_maxrss * 1024,
        "killed": len(killed),
    }
    if report is not None:
        report.write(json.dumps(result))
        report.close()
    os._exit(0)


main()
