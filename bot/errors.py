"""Exceptions whose text is meant for the member who caused them."""

from __future__ import annotations


class UserFacingError(Exception):
    """An error whose message is safe and useful to show to the member as is."""


class QueueFull(UserFacingError):
    """The GPU queue is at capacity."""


OUT_OF_MEMORY = "The GPU ran out of memory for this request. Please try again with fewer images."
OUT_OF_MEMORY_ASKING = (
    "The GPU ran out of memory for this question. Please try again with fewer or smaller images."
)
OUT_OF_MEMORY_UPSCALING = "The GPU ran out of memory while upscaling. Please try again later."


class JobCancelled(UserFacingError):
    """The job was cancelled before it ran (by its requester or a shutdown)."""


class JobFailed(UserFacingError):
    """The model could not finish the job; the text says why."""


class BadAttachment(UserFacingError):
    """An attachment that is not a usable image."""


class BadPrompt(UserFacingError):
    """A prompt or question that cannot be used."""


class QuotaExceeded(UserFacingError):
    """A usage limit says no."""


class StartupError(Exception):
    """The bot or a worker cannot start (a setting to fix, a model that cannot be loaded); one line says which
    setting and how. Not for members: it stops the process with that line."""
