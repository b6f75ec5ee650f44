"""The sandbox's seccomp filter, compiled once with libseccomp into a BPF program.

Allow by default and refuse what a tool never needs and what breaks isolation: tracing other
processes, namespaces and mounts, kernel modules and keyrings, BPF, perf, io_uring, clock and
reboot calls, and sockets other than Unix, IPv4 and IPv6. Refused calls kill the process
(reported as a sandbox violation), except socket families, which fail with EPERM because
libraries probe them.
"""

from __future__ import annotations

import errno
import tempfile

__all__ = ["KILLED_SYSCALLS", "compile_filter"]

KILLED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "vhangup",
    "iopl",
    "ioperm",
    "personality",
    "uselib",
    "nfsservctl",
)
_ALLOWED_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6


def compile_filter() -> bytes:
    """The filter as raw BPF (``struct sock_filter`` array) for bwrap or ``prctl``."""
    import pyseccomp as sc

    flt = sc.SyscallFilter(sc.ALLOW)
    for name in KILLED_SYSCALLS:
        try:
            flt.add_rule(sc.KILL_PROCESS, name)
        except (ValueError, RuntimeError, OSError):
            continue  # a call this architecture does not have
    # clone3 passes its flags in memory a filter cannot read; ENOSYS makes libc use clone,
    # whose namespace flags are refused below.
    flt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for bit in (0x10000000, 0x20000000, 0x40000000, 0x02000000, 0x04000000, 0x08000000, 0x00020000):
        flt.add_rule(sc.KILL_PROCESS, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    for family in range(0, 64):
        if family not in _ALLOWED_FAMILIES:
            flt.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(0, sc.EQ, family))
    # TIOCSTI would let a tool type into the runner's terminal.
    flt.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, 0x5412))
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read()
