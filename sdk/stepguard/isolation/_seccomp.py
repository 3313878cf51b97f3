"""A seccomp deny-list for the local sandbox (x86-64), in the spirit of container runtimes' default.

bubblewrap installs it just before running the body. It refuses, with EPERM, the system calls a
step body has no business making and that widen the kernel attack surface or reach outside the
sandbox: kernel keyrings, BPF, perf, userfaultfd, io_uring, ptrace and cross-process memory
access, module and kexec loading, mount API, namespace joining, clock and swap control, and new
user namespaces. Other architectures, and the x32 ABI, are refused outright (the filter kills the
process) so a foreign syscall table cannot sidestep the list.
"""

from __future__ import annotations

import errno
import os
import platform
import struct

from stepguard._private.fileio import write_all

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
DENIED_X86_64: dict[str, int] = {
    "ptrace": 101, "pivot_root": 155, "chroot": 161, "acct": 163, "settimeofday": 164,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320,
    "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_LD_ABS_W = 0x20          # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15             # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35             # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45            # BPF_JMP | BPF_JSET | BPF_K
_NR_CLONE = 56
_NR_CLONE3 = 435
_CLONE_NEWUSER = 0x10000000
_RET_K = 0x06             # BPF_RET | BPF_K
_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def filter_program() -> bytes | None:
    """The compiled classic-BPF program, or None where no syscall table is known (not x86-64).

    Besides the deny-list: ``clone`` with ``CLONE_NEWUSER`` is refused (EPERM) and ``clone3`` --
    whose flags a classic filter cannot read -- answers ENOSYS, so libc falls back to ``clone``.
    A body therefore cannot create a user namespace even where bwrap's ``--disable-userns`` is
    not available (a sandbox started by root maps its namespace itself).
    """
    if platform.machine() not in ("x86_64", "AMD64") or struct.calcsize("P") != 8:
        return None
    nrs = sorted(DENIED_X86_64.values())
    # (code, true-label, false-label, k); labels are resolved to relative jumps below.
    prog: list[tuple[int, str | int, str | int, int]] = [
        (_LD_ABS_W, 0, 0, 4),                             # seccomp_data.arch
        (_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),               # x86-64? skip the kill
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_ABS_W, 0, 0, 0),                             # seccomp_data.nr
        (_JGE_K, "kill", 0, _X32_BIT),                    # x32 ABI -> kill
    ]
    prog += [(_JEQ_K, "eperm", 0, nr) for nr in nrs]
    prog += [
        (_JEQ_K, "enosys", 0, _NR_CLONE3),
        (_JEQ_K, 0, "allow", _NR_CLONE),
        (_LD_ABS_W, 0, 0, 16),                            # low half of args[0]: clone flags
        (_JSET_K, "eperm", "allow", _CLONE_NEWUSER),
    ]
    labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2,
              "kill": len(prog) + 3}
    prog += [(_RET_K, 0, 0, _RET_ALLOW), (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
             (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS), (_RET_K, 0, 0, _RET_KILL_PROCESS)]

    def rel(here: int, target: str | int) -> int:
        return target if isinstance(target, int) else labels[target] - here - 1

    return b"".join(_insn(code, rel(i, jt), rel(i, jf), k)
                    for i, (code, jt, jf, k) in enumerate(prog))


def filter_fd() -> int | None:
    """A memfd holding the program, positioned at 0, for ``bwrap --seccomp FD``."""
    prog = filter_program()
    if prog is None:
        return None
    fd = os.memfd_create("stepguard-seccomp", os.MFD_CLOEXEC)
    write_all(fd, prog)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
