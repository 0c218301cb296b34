"""Errors that processors raise for one sample."""


class SkipSample(Exception):
    """This sample cannot be used; it is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
