"""A client generated from /openapi.json by openapi-python-client (issue 25, "Outside checks
in CI") imports and runs the main flows against the app served over HTTP, each asserting the
answer: moderate (multipart and JSON), decisions page by cursor, one decision, search by text
as CSV, claim and verdict, stats, quality.

Operations are found by method and path in the generated modules (not by their generated
names, which follow the document's operationIds and tags), and bodies and enums through the
generated functions' annotations, so the test does not depend on how the document names them.
"""

from __future__ import annotations

import base64
import csv
import enum
import importlib
import io
import json
import re
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from flask import Flask

from moderation import Moderator
from moderation.policy import parse_policy
from service.app import create_app
from tests.fakes import (
    BLUE,
    GREEN,
    HAND_COLOURS,
    HAND_POLICY,
    HAND_TEXTS,
    PURPLE,
    RED,
    FakeEncoder,
    image_bytes,
)
from tests.service.conftest import ADMIN, READER, moderate_images
from tests.service.live import serve_in_thread

pytestmark = pytest.mark.fuzz

PACKAGE = "moderation_generated_client"
ANN = "ann-client-token"
IMAGES = {"rifle": image_bytes(RED), "toy": image_bytes(BLUE, "JPEG"),
          "between": image_bytes(PURPLE), "beer": image_bytes(GREEN)}
#: what the hand-made policy decides for each (tests/fakes.py)
ACTIONS = {"rifle": "block", "toy": "allow", "between": "review", "beer": "flag"}


class Generated:
    """The generated package, its generator's output, and its operations by method and path."""

    def __init__(self, root: Path, output: str) -> None:
        self.root = root
        self.output = output
        self.package = importlib.import_module(PACKAGE)
        self.modules: dict[tuple[str, str], str] = {}
        found = re.compile(r'"method":\s*"(\w+)",\s*"url":\s*"([^"]+)"')
        for source in sorted((root / PACKAGE / "api").rglob("*.py")):
            match = found.search(source.read_text())
            if match:
                name = ".".join(source.relative_to(root).with_suffix("").parts)
                self.modules[(match[1].upper(), match[2])] = name

    def operation(self, method: str, path: str) -> ModuleType:
        """The generated module of ``method path`` (imported now: an import error is the
        generator's, and fails the flow that needs it)."""
        assert (method, path) in self.modules, f"the client has no {method} {path}"
        return importlib.import_module(self.modules[(method, path)])

    def client(self, base: str, token: str) -> Any:
        return self.package.AuthenticatedClient(base_url=base, token=token,
                                                raise_on_unexpected_status=True)


CLIENT_CONFIG = Path(__file__).parents[2] / "clients" / "openapi-python-client.yaml"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generated]:
    """The client generated from the document of an app like the tests' (once per module)."""
    folder = tmp_path_factory.mktemp("client")
    policy = folder / "policy.yaml"
    policy.write_text(yaml.safe_dump(HAND_POLICY, sort_keys=False))
    app = create_app({"POLICY": str(policy), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
                      "REVIEWERS": f"ann:{ANN}",
                      "DATABASE_URL": f"sqlite:///{folder / 'decisions.sqlite3'}"},
                     moderator=Moderator(parse_policy(policy.read_text()),
                                         FakeEncoder(dict(HAND_TEXTS), dict(HAND_COLOURS))))
    answer = app.test_client().get("/openapi.json")
    assert answer.status_code == 200
    (folder / "openapi.json").write_text(json.dumps(answer.get_json()))
    # the configuration the README gives (clients/openapi-python-client.yaml): its media-type
    # overrides and the one post hook that works around the generator's issue #1451
    run = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json",
         "--output-path", PACKAGE, "--meta", "none", "--config", str(CLIENT_CONFIG)],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    sys.path.insert(0, str(folder))
    try:
        yield Generated(folder, run.stdout + run.stderr)
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


@pytest.fixture
def review_app(make_app: Callable[..., Flask]) -> Flask:
    """Every route enabled; the hand-made policy sends PURPLE to review (nothing is audited)."""
    return make_app(REVIEWERS=f"ann:{ANN}", AUDIT_RATE="0")


@pytest.fixture
def live(review_app: Flask) -> Iterator[str]:
    with serve_in_thread(review_app) as base:
        yield base


def moderated(app: Flask) -> dict[str, dict[str, Any]]:
    """The four hand-made images moderated (through the test client) and in the log."""
    return moderate_images(app.test_client(), app, IMAGES)


def annotation(function: Callable[..., Any], name: str) -> list[Any]:
    """The types a generated function's parameter takes, without ``Unset``."""
    hint = typing.get_type_hints(function)[name]
    return [t for t in typing.get_args(hint) or (hint,) if t.__name__ != "Unset"]


def enum_value(function: Callable[..., Any], name: str, value: str) -> Any:
    """``value`` as the generated enum of parameter ``name`` (or as it is, if a string)."""
    for kind in annotation(function, name):
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return kind(value)
    return value


def keyword(function: Callable[..., Any], name: str) -> str:
    """The generated keyword of query parameter ``name`` (``format`` becomes ``format_``)."""
    names = typing.get_type_hints(function)
    return name if name in names else f"{name}_"


def body_kinds(module: ModuleType) -> tuple[type, type]:
    """The generated body models of POST /v1/moderate: (multipart, JSON)."""
    kinds = [k for k in annotation(module.sync_detailed, "body") if isinstance(k, type)]
    multipart = [k for k in kinds if hasattr(k, "to_multipart")]
    plain = [k for k in kinds if not hasattr(k, "to_multipart")]
    assert len(multipart) == 1 and len(plain) == 1, f"two bodies expected, got {kinds}"
    return multipart[0], plain[0]


def results_by_id(parsed: Any) -> dict[str, Any]:
    return {result.id: result for result in parsed.results}


def test_moderate_multipart(generated: Generated, live: str) -> None:
    module = generated.operation("POST", "/v1/moderate")
    multipart, _ = body_kinds(module)
    files = generated.package.types.File
    body = multipart.from_dict({"image": [b""] * len(IMAGES), "id": list(IMAGES)})
    body.image = [files(payload=io.BytesIO(data), file_name=f"{name}.img")
                  for name, data in IMAGES.items()]
    answer = module.sync_detailed(client=generated.client(live, ADMIN), body=body)
    assert answer.status_code == 200, answer.content
    results = results_by_id(answer.parsed)
    assert {k: str(getattr(r.action, "value", r.action)) for k, r in results.items()} == ACTIONS
    assert list(results["rifle"].triggered) == ["weapons"]


def test_moderate_json(generated: Generated, live: str) -> None:
    module = generated.operation("POST", "/v1/moderate")
    _, plain = body_kinds(module)
    body = plain.from_dict({"images": [
        {"data": base64.b64encode(data).decode(), "id": name} for name, data in IMAGES.items()]})
    answer = module.sync_detailed(client=generated.client(live, ADMIN), body=body)
    assert answer.status_code == 200, answer.content
    results = results_by_id(answer.parsed)
    assert {k: str(getattr(r.action, "value", r.action)) for k, r in results.items()} == ACTIONS


def test_decisions_page_by_cursor_and_one_decision(generated: Generated, review_app: Flask,
                                                   live: str) -> None:
    ids = {name: result["decision_id"] for name, result in moderated(review_app).items()}
    pages = generated.operation("GET", "/v1/decisions")
    reader = generated.client(live, READER)
    seen: list[str] = []
    cursor: Any = None
    for _ in range(len(IMAGES)):  # two a page: two pages, then an empty one or none
        kwargs = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        answer = pages.sync_detailed(client=reader, **kwargs)
        assert answer.status_code == 200, answer.content
        seen += [d.id for d in answer.parsed.decisions]
        assert len(answer.parsed.decisions) <= 2
        cursor = answer.parsed.next_cursor
        if not isinstance(cursor, str):
            break
    assert sorted(seen) == sorted(ids.values())  # every decision once, newest first
    one = generated.operation("GET", "/v1/decisions/{decision_id}")
    answer = one.sync_detailed(ids["between"], client=reader)
    assert answer.status_code == 200, answer.content
    decision = answer.parsed
    assert (decision.id, decision.client_id) == (ids["between"], "between")
    assert str(getattr(decision.action, "value", decision.action)) == "review"


def test_search_by_text_as_csv(generated: Generated, review_app: Flask, live: str) -> None:
    """The CSV answer has a path of its own (the generator reads one media type per answer:
    GET /v1/search?format=csv would be parsed as JSON)."""
    ids = {name: result["decision_id"] for name, result in moderated(review_app).items()}
    search = generated.operation("GET", "/v1/search.csv").sync_detailed
    answer = search(client=generated.client(live, READER), q="a rifle",
                    raw=enum_value(search, "raw", "true"))
    assert answer.status_code == 200, answer.content
    assert answer.headers["content-type"].startswith("text/csv")
    assert isinstance(answer.parsed, str)
    rows = list(csv.DictReader(io.StringIO(answer.parsed)))
    assert [r["decision_id"] for r in rows][:2] == [ids["rifle"], ids["between"]]
    assert (rows[0]["client_id"], rows[0]["action"], float(rows[0]["similarity"])) == (
        "rifle", "block", pytest.approx(1.0))
    lines = generated.operation("GET", "/v1/search.jsonl").sync_detailed(
        client=generated.client(live, READER), q="a rifle", raw=enum_value(search, "raw", "true"))
    assert [json.loads(line)["decision_id"] for line in lines.parsed.splitlines()][:2] == [
        ids["rifle"], ids["between"]]


def test_a_policy_version_as_its_file(generated: Generated, review_app: Flask,
                                      live: str) -> None:
    versions = generated.operation("GET", "/v1/policy/versions").sync(
        client=generated.client(live, READER))
    version = versions.versions[0].version
    answer = generated.operation("GET", "/v1/policy/versions/{version}/file").sync_detailed(
        version, client=generated.client(live, READER))
    assert answer.status_code == 200, answer.content
    assert yaml.safe_load(answer.content)["name"] == HAND_POLICY["name"]


def test_claim_and_verdict(generated: Generated, review_app: Flask, live: str) -> None:
    ids = {name: result["decision_id"] for name, result in moderated(review_app).items()}
    ann = generated.client(live, ANN)
    claimed = generated.operation("POST", "/v1/reviews/claim").sync_detailed(client=ann)
    assert claimed.status_code == 200, claimed.content
    item = claimed.parsed
    assert (item.decision_id, str(getattr(item.reason, "value", item.reason))) == (
        ids["between"], "review")
    decide = generated.operation("POST", "/v1/reviews/{item_id}").sync_detailed
    (verdict_kind,) = annotation(decide, "body")
    answer = decide(item.item_id, client=ann, body=verdict_kind.from_dict(
        {"violations": ["weapons"], "note": "a real rifle"}))
    assert answer.status_code == 201, answer.content
    verdict = answer.parsed
    assert (verdict.item_id, verdict.reviewer, list(verdict.violations)) == (
        item.item_id, "ann", ["weapons"])
    assert str(getattr(verdict.action, "value", verdict.action)) == "block"
    nothing = generated.operation("POST", "/v1/reviews/claim").sync_detailed(client=ann)
    assert nothing.status_code == 204  # the queue ran dry


def test_stats(generated: Generated, review_app: Flask, live: str) -> None:
    moderated(review_app)
    stats = generated.operation("GET", "/v1/stats").sync_detailed
    answer = stats(client=generated.client(live, READER),
                   bucket=enum_value(stats, "bucket", "day"))
    assert answer.status_code == 200, answer.content
    assert answer.parsed is not None, "the client does not read /v1/stats' answer"
    assert str(getattr(answer.parsed.bucket, "value", answer.parsed.bucket)) == "day"
    buckets = answer.parsed.buckets
    assert sum(b.total for b in buckets) == len(IMAGES)
    actions: dict[str, int] = {}
    for b in buckets:
        for action, n in b.actions.to_dict().items():
            actions[action] = actions.get(action, 0) + n
    assert actions == {"allow": 1, "block": 1, "flag": 1, "review": 1}


def test_quality(generated: Generated, review_app: Flask, live: str) -> None:
    moderated(review_app)
    client = review_app.test_client()
    item = client.post("/v1/reviews/claim", headers={"Authorization": f"Bearer {ANN}"})
    decided = client.post(f"/v1/reviews/{item.get_json()['item_id']}",
                          json={"violations": ["weapons"]},
                          headers={"Authorization": f"Bearer {ANN}"})
    assert decided.status_code == 201
    quality = generated.operation("GET", "/v1/quality").sync_detailed
    answer = quality(client=generated.client(live, READER))
    assert answer.status_code == 200, answer.content
    parsed = answer.parsed
    assert parsed.verdicts == 1
    assert sorted(parsed.categories.to_dict()) == ["alcohol", "weapons"]


def test_the_generator_keeps_every_operation_body_and_answer(generated: Generated) -> None:
    """Nothing of the document is left out of the client: every operation has a module that
    imports, and the generator warned of no body, answer or schema it could not use."""
    document = json.loads((generated.root / "openapi.json").read_text())
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item if method in {"get", "post", "put", "patch", "delete"}}
    assert documented - set(generated.modules) == set()
    broken = {}
    for key in sorted(generated.modules):
        try:
            generated.operation(*key)
        except Exception as e:  # noqa: BLE001 - each is reported below
            broken[" ".join(key)] = repr(e)
    assert broken == {}
    assert "WARNING" not in generated.output and "Unable to" not in generated.output, (
        generated.output)
