"""The converter's error: bad input named in one line (the CLI prints it and exits 1)."""

from zptr.errors import ZptrError


class ConvertError(ZptrError, ValueError):
    """Bad converter input: the message names the file and the problem."""
