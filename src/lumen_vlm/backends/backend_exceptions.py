"""Errors raised by runtime backends."""


class BackendError(Exception):
    """A runtime backend failed."""


class BackendLoadError(BackendError):
    """The model's graphs could not be loaded on the requested providers."""


class BackendInputError(BackendError, ValueError):
    """The backend was given inputs it cannot run (wrong shape, too long for the context)."""
