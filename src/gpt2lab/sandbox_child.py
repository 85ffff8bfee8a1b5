"""The child side of `gpt2lab.sandbox`: run as a script (`python -I sandbox_child.py SETTINGS`),
never imported by gpt2lab, and with nothing of gpt2lab on its path.

It reads the program from its standard input, forks, and in the child closes off what it can
before the program's first line: resource limits, no new privileges, no capabilities (when
started as root), Landlock (the file system: read-only system and Python folders, read-write
the working folder, nothing else) and a seccomp filter (no new processes or programs, no
signals to other processes, no sockets, none of the administrator's system calls). Then it runs
the program in that process. The parent half only waits and passes the exit status on, so the
program's parent process is this one, not gpt2lab.

The file descriptor `status_fd` of the settings receives one JSON line naming the guards that took effect and, when the
program ran to its end without an exception, the run's marker; the parent reads a run as passed
only from that marker and exit status 0.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import sys
import traceback

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CLONE_THREAD = 0x00010000

# Refused with EPERM: new processes and programs, reaching other processes, namespaces and
# mounts, kernel modules and the machine's clock, name and power, io_uring (its requests would
# pass around this filter), device nodes.
DENIED = (
    "fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "tkill",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "unshare", "setns", "mount", "umount2", "pivot_root",
    "chroot", "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "open_by_handle_at",
    "name_to_handle_at", "mknod", "mknodat", "io_uring_setup", "io_uring_enter", "io_uring_register", "swapon",
    "swapoff", "syslog", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "iopl", "ioperm", "quotactl", "fanotify_init", "move_mount", "open_tree", "fsopen",
    "fsmount", "fsconfig", "mount_setattr",
)
# Signals reach this process alone.
SIGNALS_TO_SELF_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def set_limits(limits: dict) -> list[str]:
    """Hard limits the program cannot raise again; the names of those set."""
    applied = []
    table = {
        "cpu_seconds": resource.RLIMIT_CPU, "memory_bytes": resource.RLIMIT_AS,
        "file_bytes": resource.RLIMIT_FSIZE, "open_files": resource.RLIMIT_NOFILE,
    }
    for name, which in table.items():
        resource.setrlimit(which, (limits[name], limits[name]))
        applied.append(name)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.get("user_processes") is not None:
        # Counted over the whole user, and not at all for root (the seccomp filter is the bound there).
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["user_processes"],) * 2)
        applied.append("user_processes")
    return applied


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges(libc) -> bool:
    """No new privileges through exec, and no capabilities left (a root process keeps its user id
    but loses what root may do beyond an ordinary user: mount, reboot, load modules, ...)."""
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    if os.geteuid() != 0:
        return True
    for capability in range(64):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    return libc.capset(ctypes.byref(header), data) == 0


def restrict_files(read: list[str], write: str) -> bool:
    """Landlock: read (and run) beneath `read`, everything but device nodes beneath `write`."""
    try:
        from landlock import FSAccess, Ruleset
    except Exception:  # not installed, or an interpreter it does not support
        return False
    # The bindings take any errno left set as their call's failure, even after a success.
    ctypes.set_errno(0)
    try:
        handled = FSAccess.all()
        ruleset = Ruleset(restrict_rules=handled)
        reading = FSAccess.READ_FILE | FSAccess.READ_DIR | FSAccess.EXECUTE
        for path in read:
            if os.path.exists(path):
                # A rule on a file may name file rights alone.
                ruleset.allow(path, rules=reading if os.path.isdir(path) else reading & FSAccess.all_file())
        ruleset.allow(write, rules=handled & ~(FSAccess.MAKE_CHAR | FSAccess.MAKE_BLOCK))
        ruleset.apply()
        return True
    except OSError:  # a kernel without Landlock, or with it switched off
        return False


def system_call_filter():
    """The seccomp filter, not yet loaded (None without libseccomp): everything not named below is
    allowed. Built before Landlock applies, since the bindings look for libseccomp with ldconfig."""
    try:
        import pyseccomp as seccomp

        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    except Exception:  # no libseccomp on this machine
        return None
    refuse = seccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        _add(rules, refuse, name)
    for name in SIGNALS_TO_SELF_ONLY:
        _add(rules, refuse, name, seccomp.Arg(0, seccomp.NE, os.getpid()))
    # Threads are processes that share this one's memory: allowed; anything else clone makes is not.
    _add(rules, refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    _add(rules, seccomp.ERRNO(errno.ENOSYS), "clone3")  # glibc then falls back to clone
    _add(rules, seccomp.ERRNO(errno.EACCES), "socket")
    return rules


def load_filter(rules) -> bool:
    if rules is None:
        return False
    try:
        rules.load()
    except OSError:
        return False
    return True


def _add(rules, action: int, name: str, *args) -> None:
    try:
        rules.add_rule(action, name, *args)
    except (OSError, ValueError, RuntimeError):  # a call this architecture does not have
        pass


def run_program(settings: dict, source: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    rules = system_call_filter()
    guards = {"limits": set_limits(settings["limits"]), "no_privileges": drop_privileges(libc)}
    guards["landlock"] = restrict_files(settings["read"], settings["work"])
    guards["seccomp"] = load_filter(rules)
    status = os.fdopen(settings["status_fd"], "w")
    status.write(json.dumps({"guards": guards}) + "\n")
    status.flush()
    try:
        code = compile(source, "<program>", "exec")
        exec(code, {"__name__": "__main__"})
    except BaseException:  # the program's failure, whatever it was, including SystemExit
        traceback.print_exc()
        return 1
    status.write(settings["marker"] + "\n")
    status.flush()
    return 0


def main() -> None:
    settings = json.loads(sys.argv[1])
    source = sys.stdin.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for path in settings["module_paths"]:
        sys.path.append(path)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = run_program(settings, source)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(settings["status_fd"])
    _, status = os.waitpid(pid, 0)
    # The program's status, as a shell reports it: a signal's death is 128 + the signal.
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
