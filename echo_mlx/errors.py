"""The one exception type users see.

Every problem a user can cause (a malformed plan, a corrupt file, a path that
exists) is raised as an ``EchoError`` whose message is one line naming the
problem and the fix. The CLI prints it without a traceback and exits with 2.
"""


class EchoError(Exception):
    """A user-facing error: one line, says what is wrong and what to do."""
