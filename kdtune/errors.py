"""The errors that stop a sweep before it starts: each becomes one message and exit status 2."""
from __future__ import annotations


class SpecError(Exception):
    """A spec problem at a key path; str() is the user-facing message."""

    def __init__(self, path: str, message: str, file: str | None = None):
        super().__init__(path, message)
        self.path, self.message, self.file = path, message, file

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.path or '<top>'}: {self.message}"


class DataError(Exception):
    """A dataset that cannot be found or read; the message says where the files go."""


class TeacherError(Exception):
    """A teacher checkpoint that is missing, unreadable or does not fit the arch."""


class TrackingError(Exception):
    """The tracking URI cannot be used."""


USER_ERRORS = (SpecError, DataError, TeacherError, TrackingError)
