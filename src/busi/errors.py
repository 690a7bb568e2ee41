"""Errors that busi raises for bad input, so callers can tell them from bugs."""


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and what is wrong."""


class WeightsDownloadError(RuntimeError):
    """Pretrained encoder weights could not be downloaded (e.g. no internet access); the message
    says which file to place where, or how to train from scratch."""
