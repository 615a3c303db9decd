"""The one exception type the command-line tools turn into a one-line message."""


class CharlmError(Exception):
    """A problem the user can fix (bad config, missing file, corrupt checkpoint): the message says how."""
