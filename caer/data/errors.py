"""The one error type for bad input data (kept apart so that every data module can raise it without import cycles)."""


class DataError(Exception):
    """Bad input data. The message names the file (and line, or frame) at fault."""
