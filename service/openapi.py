"""The OpenAPI 3.1 document of the service, served at ``/openapi.json``.

Kept next to the routes and checked against real responses in tests/service/test_openapi.py.
"""

from __future__ import annotations

from typing import Any

ACTION = {"type": "string", "enum": ["allow", "flag", "review", "block"]}
NULLABLE_NUMBER = {"type": ["number", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "Malformed request (code says what: missing_field, invalid_field, invalid_json, "
        "unknown_profile, corrupt_image, empty, …)",
        401: "Missing or wrong API key or admin token",
        403: "Admin or reader routes are disabled (no MODERATION_ADMIN_TOKEN or "
        "MODERATION_READER_TOKEN)",
        404: "No such decision",
        413: "Request too large, too many images, or (single image) too many pixels",
        415: "Unsupported media type, or (single image) unsupported image format",
        422: "The policy file on disk is not valid; the previous policy keeps serving",
    }
    return {str(s): _json(_ref("Error"), meaning[s]) for s in statuses}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "faults": {"type": "array", "items": {"type": "string"}},
                },
            }
        },
    },
    "TermMatch": {
        "type": "object",
        "required": ["text", "similarity"],
        "properties": {"text": {"type": "string"}, "similarity": {"type": "number"}},
    },
    "CategoryResult": {
        "type": "object",
        "required": ["score", "similarity", "threshold", "margin", "flagged", "action",
                     "top_terms", "closest_exception", "review_from", "frame"],
        "properties": {
            "score": {"type": "number", "minimum": -1, "maximum": 1,
                      "description": "similarity minus the exception penalty (README)"},
            "similarity": {"type": "number", "description": "cosine to the category"},
            "threshold": {"type": "number"},
            "review_from": NULLABLE_NUMBER,
            "margin": {"type": "number", "description": "score - threshold"},
            "flagged": {"type": "boolean"},
            "action": ACTION,
            "top_terms": {"type": "array", "items": _ref("TermMatch")},
            "closest_exception": {"oneOf": [_ref("TermMatch"), {"type": "null"}]},
            "frame": {"type": "integer", "minimum": 0,
                      "description": "the frame the score came from (an animation's "
                                     "category score is its maximum over the sampled frames)"},
        },
    },
    "ImageDecision": {
        "type": "object",
        "required": ["id", "action", "flagged", "triggered", "frame", "frames_scored", "image",
                     "categories", "processing_ms"],
        "properties": {
            "decision_id": {"type": "string", "description": "look it up: /v1/decisions/{id}"},
            "id": {"type": ["string", "null"]},
            "action": ACTION,
            "flagged": {"type": "boolean"},
            "triggered": {"type": "array", "items": {"type": "string"}},
            "frame": {"type": "integer",
                      "description": "the frame of the most severe category that fired"},
            "frames_scored": {"type": "integer"},
            "image": {
                "type": "object",
                "required": ["format", "width", "height", "frames"],
                "properties": {
                    "format": {"type": "string"},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "frames": {"type": "integer"},
                },
            },
            "categories": {"type": "object", "additionalProperties": _ref("CategoryResult")},
            "processing_ms": {"type": "number"},
        },
    },
    "ImageFailure": {
        "type": "object",
        "required": ["id", "error"],
        "properties": {
            "decision_id": {"type": "string"},
            "id": {"type": ["string", "null"]},
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "PolicyRef": {
        "type": "object",
        "required": ["name", "version"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
    },
    "ModerateResponse": {
        "type": "object",
        "required": ["policy", "model", "profile", "processing_ms", "results"],
        "properties": {
            "policy": _ref("PolicyRef"),
            "model": {"type": "string"},
            "profile": {"type": "string"},
            "processing_ms": {"type": "number"},
            "results": {
                "type": "array",
                "items": {"oneOf": [_ref("ImageDecision"), _ref("ImageFailure")]},
            },
        },
    },
    "Threshold": {
        "type": "object",
        "required": ["value", "review_from", "provenance"],
        "properties": {
            "value": {"type": "number"},
            "review_from": NULLABLE_NUMBER,
            "provenance": {"type": "object", "required": ["source"]},
        },
    },
    "PolicyResponse": {
        "type": "object",
        "required": ["name", "version", "model", "profiles", "categories"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "description": {"type": ["string", "null"]},
            "model": {"type": "object", "required": ["spec", "identity"]},
            "profiles": {"type": "array", "items": {"type": "string"}},
            "categories": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["description", "action", "terms", "exceptions", "thresholds"],
                    "properties": {
                        "thresholds": {
                            "type": "object",
                            "additionalProperties": _ref("Threshold"),
                        }
                    },
                },
            },
        },
    },
    "StoredDecision": {
        "type": "object",
        "required": ["id", "created_at", "client_id", "image", "policy", "model", "profile",
                     "action", "flagged", "triggered", "categories", "latency_ms",
                     "error_code"],
        "properties": {
            "id": {"type": "string"},
            "created_at": {"type": "number", "description": "unix seconds"},
            "client_id": {"type": ["string", "null"]},
            "image": {"type": "object", "required": ["sha256", "size"]},
            "policy": _ref("PolicyRef"),
            "model": {"type": "string"},
            "profile": {"type": "string"},
            "action": {"type": "string", "enum": ["allow", "flag", "review", "block", "error"]},
            "flagged": {"type": "boolean"},
            "triggered": {"type": "array", "items": {"type": "string"}},
            "categories": {"type": "object", "additionalProperties": _ref("CategoryResult")},
            "latency_ms": {"type": "number"},
            "error_code": {"type": ["string", "null"]},
        },
    },
    "DecisionPage": {
        "type": "object",
        "required": ["decisions", "next_cursor"],
        "properties": {
            "decisions": {"type": "array", "items": _ref("StoredDecision")},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
    "Stats": {
        "type": "object",
        "required": ["bucket", "buckets"],
        "properties": {
            "bucket": {"type": "string", "enum": ["hour", "day"]},
            "buckets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["start", "policy_version", "total", "actions", "categories"],
                    "properties": {
                        "start": {"type": "integer"},
                        "policy_version": {"type": "string"},
                        "total": {"type": "integer"},
                        "actions": {"type": "object",
                                    "additionalProperties": {"type": "integer"}},
                        "categories": {"type": "object", "additionalProperties": {
                            "type": "object", "required": ["flagged", "rate"]}},
                    },
                },
            },
        },
    },
    "ReloadResponse": {
        "type": "object",
        "required": ["name", "version", "previous_version", "changed"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "previous_version": {"type": "string"},
            "changed": {"type": "boolean"},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "moderation",
            "version": "1",
            "description": "Zero-shot image moderation with CLIP and YAML policies.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/moderate": {
                "post": {
                    "summary": "Moderate one or more images",
                    "description": "A request with several images always answers 200, with a "
                    "per-image error for any image that cannot be read. A request with one "
                    "image that cannot be read answers with that error's status.",
                    "security": [{}, {"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {
                                        "image": {"type": "array", "items": {
                                            "type": "string", "format": "binary"}},
                                        "id": {"type": "array", "items": {"type": "string"}},
                                        "profile": {"type": "string"},
                                    },
                                }
                            },
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["images"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "images": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "required": ["data"],
                                                "properties": {
                                                    "data": {"type": "string",
                                                             "contentEncoding": "base64"},
                                                    "id": {"type": "string"},
                                                },
                                            },
                                        },
                                        "profile": {"type": "string"},
                                    },
                                }
                            },
                        },
                    },
                    "responses": {
                        "200": _json(_ref("ModerateResponse"), "Decisions, one per image"),
                        **_errors(400, 401, 413, 415),
                    },
                }
            },
            "/v1/policy": {
                "get": {
                    "summary": "The active policy, its version and thresholds with provenance",
                    "security": [{}, {"bearer": []}],
                    "responses": {
                        "200": _json(_ref("PolicyResponse"), "The active policy"),
                        **_errors(401),
                    },
                }
            },
            "/v1/policy/reload": {
                "post": {
                    "summary": "Reload the policy file (admin token)",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": _json(_ref("ReloadResponse"), "The new policy is active"),
                        **_errors(401, 403, 422),
                    },
                }
            },
            "/v1/decisions": {
                "get": {
                    "summary": "Recorded decisions, newest first (reader token)",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {"name": n, "in": "query", "required": False, "schema": sch}
                        for n, sch in (
                            ("since", {"type": "string"}), ("until", {"type": "string"}),
                            ("action", {"type": "string"}), ("category", {"type": "string"}),
                            ("policy_version", {"type": "string"}),
                            ("client_id", {"type": "string"}),
                            ("flagged", {"type": "string", "enum": ["true", "false"]}),
                            ("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                            ("cursor", {"type": "string"}),
                        )
                    ],
                    "responses": {
                        "200": _json(_ref("DecisionPage"), "A page of decisions"),
                        **_errors(400, 401, 403),
                    },
                }
            },
            "/v1/decisions/{decision_id}": {
                "get": {
                    "summary": "One recorded decision (reader token)",
                    "security": [{"bearer": []}],
                    "parameters": [{"name": "decision_id", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {
                        "200": _json(_ref("StoredDecision"), "The decision"),
                        **_errors(401, 403, 404),
                    },
                }
            },
            "/v1/stats": {
                "get": {
                    "summary": "Counts and flag rates per time bucket and policy version",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {"name": n, "in": "query", "required": False, "schema": sch}
                        for n, sch in (
                            ("since", {"type": "string"}), ("until", {"type": "string"}),
                            ("bucket", {"type": "string", "enum": ["hour", "day"]}),
                            ("policy_version", {"type": "string"}),
                        )
                    ],
                    "responses": {
                        "200": _json(_ref("Stats"), "Statistics"),
                        **_errors(400, 401, 403),
                    },
                }
            },
            "/dashboard": {
                "get": {
                    "summary": "The trust-and-safety dashboard (reader token, or ?token=)",
                    "responses": {"200": {"description": "HTML page",
                                          "content": {"text/html": {"schema": {
                                              "type": "string"}}}},
                                  **_errors(401, 403)},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is alive",
                    "responses": {"200": _json({"type": "object", "required": ["status"]},
                                               "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Model and policy are loaded",
                    "responses": {"200": _json(
                        {"type": "object", "required": ["status", "policy", "model"]}, "Ready")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "Prometheus text format",
                                          "content": {"text/plain": {"schema": {
                                              "type": "string"}}}}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                }
            },
        },
    }
