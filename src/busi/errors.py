"""Errors that busi raises for bad input, so callers can tell them from bugs."""


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and what is wrong."""
