"""The shapes only HTTP needs: problem details, list envelopes and the health answer.

The resources themselves (Sandbox, Exec, Info and the request bodies) are daemon.shapes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from daemon.shapes import Exec, ExecExit, ExecOutput, Image, Sandbox

__all__ = ["ExecExit", "ExecOutput"]


class ValidationIssue(BaseModel):
    """One reason a request failed validation, in pydantic's terms."""

    loc: list[str | int] = Field(description="Where: e.g. ['body', 'network', 'mode'].")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. 'missing' or 'json_invalid'.")


class Problem(BaseModel):
    """An RFC 9457 problem details object (media type application/problem+json)."""

    type: str = Field(description="A stable URI naming the kind of problem.")
    title: str
    status: int
    detail: str
    errors: list[ValidationIssue] | None = Field(
        default=None, description="For 400 and 422: each thing wrong with the request."
    )


class SandboxList(BaseModel):
    items: list[Sandbox] = Field(description="Oldest first.")


class ExecList(BaseModel):
    items: list[Exec] = Field(description="Oldest first.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ImageList(BaseModel):
    items: list[Image] = Field(description="Oldest first.")
