"""Errors the HTTP layer turns into responses: status code, message, and the field at fault."""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {
            400: "BadRequestError",
            401: "AuthenticationError",
            404: "NotFoundError",
            408: "TimeoutError",
            413: "RequestTooLargeError",
            424: "ModelError",
            503: "ServiceUnavailableError",
        }.get(status, "InternalServerError")

    def openai_body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}

    def lmi_body(self) -> dict[str, object]:
        return {"error": self.message, "code": self.status, **({"param": self.param} if self.param else {})}
