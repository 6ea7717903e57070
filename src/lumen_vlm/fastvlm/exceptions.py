"""Errors raised while turning a request into model inputs, from the wire format on.

The service maps every `InputError` to INVALID_ARGUMENT; anything else escaping the
model manager is treated as our own bug (INTERNAL).
"""


class InputError(ValueError):
    """The request itself is wrong: the client can fix it and retry."""


class ImageError(InputError):
    """The image payload cannot be used (corrupt, empty, unsupported, too large)."""


class PromptError(InputError):
    """The messages or prompt cannot be turned into model input."""


class RequestError(InputError):
    """The request is malformed (its wire format or a meta value): the client can fix it."""
