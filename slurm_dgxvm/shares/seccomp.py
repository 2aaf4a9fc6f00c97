"""A seccomp filter that refuses setuid and setgid mode bits.

Installed by the share's virtiofsd wrapper before it execs virtiofsd (filters stack: virtiofsd's
own allow-list still applies). Every x86-64 system call that takes a file mode is checked: a
mode with S_ISUID or S_ISGID gets EPERM, so neither chmod from the guest nor a create with those
bits leaves a setuid/setgid file on the host. openat2 (its mode is behind a pointer the filter
cannot read) answers ENOSYS, which makes callers fall back to openat; x32 calls are refused.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from .userns import check, libc

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
RET_KILL_PROCESS = 0x80000000

SETID_BITS = 0o6000

# x86-64 system call number -> index of its mode argument.
MODE_ARG = {
    2: 2,      # open(path, flags, mode)
    85: 1,     # creat(path, mode)
    83: 1,     # mkdir(path, mode)
    90: 1,     # chmod(path, mode)
    91: 1,     # fchmod(fd, mode)
    133: 1,    # mknod(path, mode, dev)
    257: 3,    # openat(dirfd, path, flags, mode)
    258: 2,    # mkdirat(dirfd, path, mode)
    259: 2,    # mknodat(dirfd, path, mode, dev)
    268: 2,    # fchmodat(dirfd, path, mode)
    452: 2,    # fchmodat2(dirfd, path, mode, flags)
}
OPENAT2 = 437


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program() -> bytes:
    """The BPF program, as the kernel's array of struct sock_filter."""
    out = [_ins(_LD_W_ABS, 4),                                   # seccomp_data.arch
           _ins(_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
           _ins(_RET_K, RET_KILL_PROCESS),
           _ins(_LD_W_ABS, 0),                                   # seccomp_data.nr
           _ins(_JGE_K, X32_SYSCALL_BIT, 0, 1),
           _ins(_RET_K, RET_ERRNO | errno.ENOSYS),
           _ins(_JEQ_K, OPENAT2, 0, 1),
           _ins(_RET_K, RET_ERRNO | errno.ENOSYS)]
    for nr, arg in sorted(MODE_ARG.items()):
        out += [_ins(_JEQ_K, nr, 0, 4),
                _ins(_LD_W_ABS, 16 + 8 * arg),                   # low half of args[arg]
                _ins(_JSET_K, SETID_BITS, 0, 1),
                _ins(_RET_K, RET_ERRNO | errno.EPERM),
                _ins(_RET_K, RET_ALLOW)]
    out.append(_ins(_RET_K, RET_ALLOW))
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_no_setid() -> None:
    """Install the filter on this thread (and what it execs); sets no_new_privs first."""
    code = program()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
           "prctl(PR_SET_SECCOMP)")
