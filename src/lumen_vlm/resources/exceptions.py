"""Errors about configuration and model resources: they stop the server before it serves."""

CONFIG_ERROR_EXIT = 2  # the exit status of a process stopped by a ResourceError


class ResourceError(Exception):
    """Base class for resource problems."""


class ConfigError(ResourceError):
    """The configuration is invalid; the message names the key."""


class ModelFilesError(ResourceError):
    """A model directory is missing files, or its files contradict each other."""


class ModelNotFoundError(ResourceError):
    """A model name could not be resolved to a directory."""
