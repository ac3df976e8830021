"""An outside fuzzer over every operation of /openapi.json (issue 25, "Outside checks in CI").

Schemathesis reads the app's own document, generates requests for every operation (its
examples, coverage and fuzzing phases; valid and invalid data) and runs its response checks on
each answer, in-process through the WSGI app. The run is bounded (a few examples per operation,
derandomised so that CI sees the same requests every time) and repeated for three callers: the
admin token (which also reads), a reviewer's token, and no token at all.

A failure prints the request that reproduces it (as a curl command) and the check that failed.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
import yaml
from schemathesis.specs.openapi.checks import positive_data_acceptance

from moderation import Moderator
from moderation.policy import parse_policy
from service.app import create_app
from tests.fakes import (
    BLUE,
    GREEN,
    HAND_COLOURS,
    HAND_TEXTS,
    PURPLE,
    RED,
    FakeEncoder,
    image_bytes,
)
from tests.service.conftest import ADMIN, READER

pytestmark = pytest.mark.fuzz

REVIEWER = "ann-fuzz-token"
#: who calls: the token sent as ``Authorization: Bearer`` (None: no token at all)
CALLERS: dict[str, str | None] = {"admin": ADMIN, "reviewer": REVIEWER, "anonymous": None}

#: examples per operation and phase: small enough for CI (a few minutes for all callers)
MAX_EXAMPLES = 25
SEED = 25  # issue 25

# Every check schemathesis has runs, except these, which cannot apply to a stateless run of
# this API (they only act on what its stateful phase links together, and the document has no
# links and the API no DELETE):
#   use_after_free, ensure_resource_availability: a resource read after its DELETE / just
#     after the POST that created it;
#   object_level_authorization: one identity reading what another created through a link.
# (They would pass vacuously; leaving them out says so instead of counting them.)
# positive_data_acceptance (valid data must not get a 400/413/415/422) is left out where only
# the server can judge a value, as it alone knows which ids exist: an image's bytes (`format:
# binary` cannot say "a decodable PNG"), a policy's YAML text (no schema says "a policy whose
# terms encode"), the categories a verdict names (those of the decision's policy) and a
# decisions cursor (opaque: a well-formed string that no page handed out is refused); and
# for GET /v1/search (and its .csv and .jsonl), its rule "exactly one of q and like", which
# its description states and no OpenAPI parameter list can (the fuzzing phase keeps to it
# through filter_query below; the coverage phase applies no hooks).
# Everything else stays: not_a_server_error, status_code_conformance,
# content_type_conformance, response_headers_conformance, response_schema_conformance,
# negative_data_rejection, missing_required_header, ignored_auth, unsupported_method,
# allow_header_conformance.
STATELESS_ONLY = ("use_after_free", "ensure_resource_availability", "object_level_authorization")
BODY_ONLY_A_SERVER_CAN_JUDGE = {
    "POST /v1/moderate", "POST /v1/search", "POST /v1/policy/dry-run",
    "POST /v1/reviews/{item_id}",
    # an upload's bytes again, and a decision id or a file of hashes only the log can judge
    "POST /v1/hash", "POST /v1/match", "POST /v1/banks/{name}/hashes",
    "POST /v1/banks/{name}/import", "POST /v1/integrations/pict-rs",
    "POST /v1/detect-images", "POST /v1/banks/{name}/dry-run",
}
ONE_OF_TWO_PARAMETERS = {"GET /v1/search", "GET /v1/search.csv", "GET /v1/search.jsonl"}


class AnyTextEncoder(FakeEncoder):
    """The hand-made encoder, which also encodes texts it has no vector for (as a real model
    does: search texts and a proposed policy's new terms are anything a caller sends), each to
    a fixed vector drawn from its hash."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        for text in texts:
            if text not in self.texts:
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
                vector = np.random.default_rng(seed).standard_normal(3)
                self.texts[text] = (vector / np.linalg.norm(vector)).astype(np.float32)
        return super().encode_texts(texts)


def config(token: str | None) -> schemathesis.Config:
    settings: dict[str, Any] = {
        "seed": SEED,
        "suppress-health-check": ["all"],  # slow data generation is fine here
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
        "checks": {name: {"enabled": False} for name in STATELESS_ONLY},
    }
    if token is not None:
        settings["auth"] = {"openapi": {"bearer": {"bearer": token}}}
    return schemathesis.Config.from_dict(settings)


@pytest.fixture(params=list(CALLERS))
def fuzzed_app(request: pytest.FixtureRequest, policy_path: Path) -> Any:
    """The app with every route enabled and a few decisions (one of them waiting for review)
    in its log, loaded by schemathesis as the caller ``request.param`` sees it."""
    # schemathesis (4.32) names each operation's subtest through pytest's private
    # ``Function._nodeid``, which pytest 9.2 no longer has (its ``nodeid`` is a property)
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
    from tests.service.test_misskey import policy_with

    # with Misskey's classes and a fitted probability, so that detect-images answers
    policy_path.write_text(yaml.safe_dump(policy_with({"classes": {"nsfw": ["weapons"]}}),
                                          sort_keys=False))
    app = create_app(
        {"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
         "REVIEWERS": f"ann:{REVIEWER}", "AUDIT_RATE": "0",
         "IMAGE_URL_TEMPLATE": "https://img.internal/{client_id}",
         "DATABASE_URL": f"sqlite:///{policy_path.parent / 'decisions.sqlite3'}"},
        moderator=Moderator(parse_policy(policy_path.read_text()),
                            AnyTextEncoder(dict(HAND_TEXTS), dict(HAND_COLOURS))),
    )
    client = app.test_client()
    images = {"rifle": image_bytes(RED), "toy": image_bytes(BLUE, "JPEG"),
              "between": image_bytes(PURPLE), "beer": image_bytes(GREEN)}
    answer = client.post("/v1/moderate", content_type="multipart/form-data", data={
        "image": [(io.BytesIO(b), f"{k}.img") for k, b in images.items()], "id": list(images)})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    app.extensions["decisions"][1].flush()
    return schemathesis.openapi.from_wsgi("/openapi.json", app,
                                          config=config(CALLERS[request.param]))


schema = schemathesis.pytest.from_fixture("fuzzed_app")


@schemathesis.hook
def filter_query(ctx: Any, query: dict[str, Any] | None) -> bool:
    """GET /v1/search takes exactly one of q and like: its description says so, and no
    OpenAPI parameter list can. A valid request names one (the others are refused, as
    tests/service/test_search.py and test_contract.py check)."""
    if ctx.operation is None or ctx.operation.label not in ONE_OF_TWO_PARAMETERS:
        return True
    given = {k for k, v in (query or {}).items() if v is not None}
    return len(given & {"q", "like"}) == 1


@schema.parametrize()
def test_every_operation_keeps_its_contract(case: schemathesis.Case) -> None:
    excluded = []
    if (case.operation.label in BODY_ONLY_A_SERVER_CAN_JUDGE | ONE_OF_TWO_PARAMETERS
            or "cursor" in (case.query or {})):
        excluded.append(positive_data_acceptance)
    case.call_and_validate(excluded_checks=excluded)
