"""The one error type of the adapter side."""

from __future__ import annotations


class AdapterError(ValueError):
    """A model, adapter file or adapter config that does not fit; the message says what."""
