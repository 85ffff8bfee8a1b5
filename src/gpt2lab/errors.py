"""The one exception type for mistakes a user can fix.

The CLI prints a UserError's message without a traceback and exits with status 2;
anything else is a bug and propagates normally. It is a ValueError so that Python callers
who already catch bad values catch it too.
"""

import errno


class UserError(ValueError):
    """A problem with the user's input: the message names the problem and the fix."""


# Faults of the disk written to, not bugs: no space (or quota), or mounted read-only.
_DISK_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
}


def disk_fault(error: OSError) -> UserError | None:
    """The UserError for an OSError that a full or read-only output disk raised (None for others).

    The CLI turns these into its one-line message in one place, whatever verb was writing."""
    reason = _DISK_FAULTS.get(error.errno)
    if reason is None:
        return None
    where = f" writing {error.filename}" if error.filename else ""
    return UserError(
        f"{reason}{where}; free space or choose an --out on a writable disk, then run the command again "
        "(complete files already written are kept)"
    )
