"""One exception type for mistakes a user can fix: bad paths, bad files, bad values.

The CLI prints these as one line and exits with `exit_code`; anything else is a bug and keeps its
traceback. Messages name the file / tensor / key and what was expected.
"""

from __future__ import annotations

# Documented exit codes (README "Exit codes").
EXIT_USER_ERROR = 2  # bad argument, bad input file, unknown scheme
EXIT_IO_ERROR = 3  # output cannot be written (exists, permissions, disk full)
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM: nothing left at the output path


class GemmaQuantError(Exception):
    """A user-facing error: one clear line, no traceback."""

    exit_code = EXIT_USER_ERROR


class OutputError(GemmaQuantError):
    """The output cannot be written (exists without --force, unwritable, no space)."""

    exit_code = EXIT_IO_ERROR
