"""The error of a malformed update or tensor on the wire, with the gRPC status it maps to."""
from __future__ import annotations


class WireError(ValueError):
    """A tensor or update does not match its declaration. `code` names the gRPC status it maps to."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code = code
