"""OpenAI-style errors: every failure is `{"error": {"message", "type", "param", "code"}}`."""
from __future__ import annotations

from typing import Any, Optional

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
               type: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(err: APIError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code, err.type), status_code=err.status,
                        headers=headers)
