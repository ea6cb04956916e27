"""The one exception family the CLI turns into a clean one-line error and a non-zero exit."""


class ZptrError(Exception):
    """Bad input or state that a user can fix; the message names the problem."""
