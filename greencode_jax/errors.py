"""The one exception type a user can cause.

Every mistake a user can make (a bad path, an unsupported architecture, a corrupt
file, a malformed config) raises `GreencodeError` with a message naming the file,
field or tensor and what was expected. The CLI prints that one line and exits
non-zero without a traceback.
"""


class GreencodeError(Exception):
    """A problem with the user's input, described in one line."""
