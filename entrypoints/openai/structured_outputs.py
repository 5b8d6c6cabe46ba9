"""A request's output constraint from whichever field names it: OpenAI's `response_format`, vLLM's
`structured_outputs`, or vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` /
`structural_tag`. At most one of them; a bad spec is a 400 that says what is wrong."""
from __future__ import annotations

import json
from typing import Any, Optional

from pageport.core.sampling_params import StructuredOutputsParams
from pageport.entrypoints.openai.errors import bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "structural_tag": "structural_tag"}


def _from_response_format(rf) -> Optional[dict[str, Any]]:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"json_object": True}
    if rf.type == "json_schema":
        schema = rf.json_schema.json_schema if rf.json_schema is not None else None
        if schema is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema", "response_format")
        # strict or not, the grammar admits only what the schema allows (no undeclared properties)
        return {"json": schema}
    tag = rf.model_dump(exclude_none=True)
    if "format" not in tag and "structures" not in tag:
        raise bad_request("response_format of type structural_tag needs format (or structures and triggers)",
                          "response_format")
    return {"structural_tag": json.dumps(tag)}


def request_constraints(req, backend: str = "xgrammar") -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """(the field that asked, StructuredOutputsParams' keyword arguments) or (None, None)."""
    found: list[tuple[str, dict]] = []
    if req.structured_outputs is not None:
        spec = req.structured_outputs.model_dump(exclude_defaults=True)
        if "json_" in spec:
            spec["json"] = spec.pop("json_")
        found.append(("structured_outputs", spec))
    guided = {kind: getattr(req, name) for name, kind in _GUIDED.items() if getattr(req, name) is not None}
    if guided:
        if req.guided_whitespace_pattern is not None:
            guided["whitespace_pattern"] = req.guided_whitespace_pattern
        found.append((next(n for n in _GUIDED if getattr(req, n) is not None), guided))
    if req.response_format is not None:
        spec = _from_response_format(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if req.guided_decoding_backend not in (None, "auto", backend):
        raise bad_request(f"guided_decoding_backend {req.guided_decoding_backend!r} cannot be chosen per request; "
                          f"this server uses {backend} (--structured-outputs-config)", "guided_decoding_backend")
    if not found:
        return None, None
    if len(found) > 1:
        raise bad_request(f"give one output constraint, not several ({', '.join(n for n, _ in found)})",
                          found[1][0])
    return found[0]


def structured_outputs_params(param: str, spec: dict[str, Any]) -> StructuredOutputsParams:
    """StructuredOutputsParams(**spec), with a 400 naming `param` when the spec is invalid."""
    try:
        return StructuredOutputsParams(**spec)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("structured_outputs.", f"{param}: " if param != "structured_outputs" else
                             "structured_outputs.")
        raise bad_request(msg, param) from None
