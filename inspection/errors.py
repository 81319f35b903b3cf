"""Exceptions raised at the project's boundaries: each message says what was received and what is allowed."""


class InspectionError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(InspectionError, ValueError):
    """A configuration file or override is invalid."""


class ImageValidationError(InspectionError, ValueError):
    """An image cannot be accepted. `reason` is a short machine-readable code (e.g. 'truncated')."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class DataError(InspectionError, ValueError):
    """A data set cannot be used as asked (missing, empty split, one class only, ...)."""


class IntegrityError(InspectionError):
    """A file does not match the sha256 recorded for it."""


class RegistryError(InspectionError):
    """A registry operation cannot be done (unknown version, alias, gate refused, ...)."""
