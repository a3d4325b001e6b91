"""Makes the OpenAPI schema tell the truth about failures: every operation
documents the error statuses it can answer with, each with its body.

drf-spectacular documents only the success of each operation; clients (and
schemathesis, see ``tests/test_api_schema_fuzz.py``) must also know that a bad
field is a 400 ``{field: [messages]}``, and that 401, 403, 404, 409, 429 and 503
come with ``{"detail": "..."}``.
"""

from __future__ import annotations

ERROR = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
# {field: [messages]} (a batch nests a list of such objects per task), or {"detail": ...}
# for a body that is not JSON at all.
VALIDATION_ERROR = {
    "type": "object",
    "additionalProperties": {"oneOf": [{"type": "array"}, {"type": "string"}, {"type": "object"}]},
    "description": "Field name -> messages; nothing was written.",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(description: str, schema: str, **headers: dict) -> dict:
    response = {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}


def add_error_responses(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook (``SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]``)."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Error", ERROR)
    schemas.setdefault("ValidationError", VALIDATION_ERROR)
    for path, operations in result.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            errors = {
                "400": _response("Invalid input: a field message per bad field (or a JSON parse error).",
                                 "ValidationError"),
                "401": _response("No valid credentials (Authorization: Token ...).", "Error"),
                "403": _response("Not allowed for this user.", "Error"),
                "404": _response("Not found, or not visible to this user.", "Error"),
                "429": _response("Rate limit: wait Retry-After seconds.", "Error", **RETRY_AFTER),
                "503": _response("The database is unavailable; retry.", "Error", **RETRY_AFTER),
            }
            if "requestBody" in operation:
                errors["415"] = _response("The body is not JSON.", "Error")
            if path.endswith("/cancel/"):
                errors["409"] = _response("The task already ended.", "Error")
            for status, response in errors.items():
                responses.setdefault(status, response)
    return result
