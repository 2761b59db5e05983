"""Exceptions raised by the `outbox` package."""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error this package raises."""


class OutboxValidationError(OutboxError, ValueError):
    """An event field was rejected; `field` names it and `problem` says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
