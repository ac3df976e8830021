"""The policy lab through the app: a dry-run's "after" is what the service decides once the
proposed policy is active (moderate, dry-run, reload, moderate the same images again)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import (
    BLUE,
    GREEN,
    GREY,
    HAND_POLICY,
    PURPLE,
    RED,
    FakeEncoder,
    animation_bytes,
    image_bytes,
    unit,
)
from tests.service.conftest import ADMIN, READER, moderate_images

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
READER_H = {"Authorization": f"Bearer {READER}"}


IMAGES = {
    "rifle": image_bytes(RED), "toy": image_bytes(BLUE), "between": image_bytes(PURPLE),
    "beer": image_bytes(GREEN), "nothing": image_bytes(GREY),
    "clip": animation_bytes(GREY, GREEN, RED), "clip2": animation_bytes(GREY, BLUE, GREY),
}


def moderate_all(client: FlaskClient, app: Flask) -> dict[str, dict[str, Any]]:
    """Moderate every image once; the outcome per client id."""
    return moderate_images(client, app, IMAGES)


def dry_run(client: FlaskClient, policy: dict[str, Any], **query: Any) -> dict[str, Any]:
    r = client.post("/v1/policy/dry-run", data=yaml.safe_dump(policy, sort_keys=False),
                    content_type="application/yaml", headers=ADMIN_H,
                    query_string={"limit": 500, **query})
    assert r.status_code == 200, r.get_data(as_text=True)
    body: dict[str, Any] = r.get_json()
    return body


def proposal(**weapons: Any) -> dict[str, Any]:
    data = copy.deepcopy(HAND_POLICY)
    data["categories"]["weapons"].update(weapons)
    return data


@pytest.mark.parametrize("edit", [
    {"threshold": {"value": -1.0}},
    {"threshold": {"value": 1.0}},
    {"terms": ["gun", "rifle", "knife"]},
], ids=["threshold -1", "threshold 1", "added term"])
def test_the_dry_run_after_is_what_the_service_decides_once_active(
        app: Flask, client: FlaskClient, policy_path: Path, fake_encoder: FakeEncoder,
        edit: dict[str, Any]) -> None:
    fake_encoder.texts.update({"a knife": unit(0, -1, 1), "the knife": unit(-1, 1, 1)})
    before = moderate_all(client, app)
    proposed = proposal(**edit)
    report = dry_run(client, proposed)
    assert report["decisions"] == len(IMAGES) and report["left_out"]["total"] == 0

    policy_path.write_text(yaml.safe_dump(proposed, sort_keys=False))
    assert client.post("/v1/policy/reload", headers=ADMIN_H).status_code == 200
    after = moderate_all(client, app)

    for action, effect in report["actions"].items():
        assert effect["before"] == sum(r["action"] == action for r in before.values())
        assert effect["after"] == sum(r["action"] == action for r in after.values()), action
    for cid, effect in report["categories"].items():
        assert effect["after"]["flagged"] == sum(
            r["categories"][cid]["flagged"] for r in after.values())
    # every decision whose outcome changes is listed, with the live service's new outcome
    live_changed = {k for k in IMAGES if (before[k]["action"], before[k]["triggered"]) != (
        after[k]["action"], after[k]["triggered"])}
    listed = {c["client_id"]: c for c in report["changed"]}
    assert live_changed and set(listed) == live_changed
    assert report["changed_total"] == len(live_changed)
    for key, change in listed.items():
        assert change["after"]["action"] == after[key]["action"]
        assert change["after"]["triggered"] == after[key]["triggered"]
        assert change["after"]["frame"] == after[key]["frame"]
    assert report["after"]["version"] == client.get("/v1/policy").get_json()["version"]


def test_json_form_windows_and_against(app: Flask, client: FlaskClient,
                                       policy_path: Path) -> None:
    moderate_all(client, app)
    old = client.get("/v1/policy").get_json()["version"]
    text = yaml.safe_dump(proposal(threshold={"value": -1.0}), sort_keys=False)
    r = client.post("/v1/policy/dry-run", json={"policy": text, "since": "1h", "limit": 1},
                    headers=ADMIN_H)
    assert r.status_code == 200 and len(r.get_json()["changed"]) == 1
    # all but the rifle and the clip with a red frame, which weapons blocks already
    assert r.get_json()["changed_total"] == 5
    future = client.post("/v1/policy/dry-run", json={"policy": text, "since": "2100-01-01"},
                         headers=ADMIN_H).get_json()
    assert future["decisions"] == 0 and "no stored decision" in future["note"]
    policy_path.write_text(text)
    client.post("/v1/policy/reload", headers=ADMIN_H)
    back = client.post("/v1/policy/dry-run", json={"policy": text, "against": old},
                       headers=ADMIN_H).get_json()
    assert back["before"]["version"] == old and back["changed_total"] == 5
    diff = client.get(f"/v1/policy/diff?from={old}", headers=READER_H).get_json()
    assert [c["text"] for c in diff["changes"]] == [
        "weapons: threshold 0.8 → -1 (flags more)", "weapons: review from 0.6 → none"]


@pytest.mark.parametrize(("kwargs", "status", "code", "says"), [
    ({"data": "name: x\n", "content_type": "application/yaml"}, 422, "invalid_policy",
     "not valid"),
    ({"data": yaml.safe_dump(dict(HAND_POLICY, model={"name": "RN50", "pretrained": "openai"})),
      "content_type": "text/plain"}, 422, "model_mismatch",
     "belong to model fake/hand-made"),
    ({"data": "x", "content_type": "image/png"}, 415, "unsupported_media_type",
     "application/yaml"),
    ({"json": {"policy": "x", "colour": 1}}, 400, "invalid_field", "unknown fields ['colour']"),
    ({"json": {"since": "1h"}}, 400, "missing_field", "{\"policy\""),
    ({"json": {"policy": "name: x", "since": "yesterday"}}, 400, "invalid_field", "since:"),
    ({"json": {"policy": "name: x", "limit": 10_000}}, 400, "invalid_field", "limit"),
    ({"json": {"policy": yaml.safe_dump(HAND_POLICY), "against": "nope"}}, 404, "not_found",
     "'nope'"),
])
def test_bad_dry_runs_say_what_is_wrong(client: FlaskClient, kwargs: dict[str, Any],
                                        status: int, code: str, says: str) -> None:
    r = client.post("/v1/policy/dry-run", headers=ADMIN_H, **kwargs)
    assert r.status_code == status, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == code and says in error["message"]


def test_the_dry_run_needs_the_admin_token(client: FlaskClient) -> None:
    r = client.post("/v1/policy/dry-run", data="x", content_type="application/yaml",
                    headers=READER_H)
    assert r.status_code == 401


def test_a_stored_version_that_no_longer_validates_is_a_422(app: Flask, client: FlaskClient,
                                                           policy_path: Path) -> None:
    """A version the log keeps whose text does not validate here any more (a checkpoint file
    gone, a release that tightened the schema): the dry-run and the diff say so, with the
    faults, instead of failing with a 500."""
    from decisionlog import PolicyLog

    log = PolicyLog(app.extensions["decisions"][0].url)
    broken = dict(HAND_POLICY, templates=["a template without its placeholder"])
    log.activate(version="v-broken", name="hand", source="policy.yaml",
                 text=yaml.safe_dump(broken, sort_keys=False))
    client.post("/v1/policy/reload", headers=ADMIN_H)  # the file in force again
    r = client.post("/v1/policy/dry-run", json={"policy": policy_path.read_text(),
                                                "against": "v-broken"}, headers=ADMIN_H)
    assert r.status_code == 422, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "invalid_policy" and "'v-broken' no longer validates" in \
        error["message"] and error["faults"]
    r = client.get("/v1/policy/diff?from=v-broken", headers=READER_H)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "invalid_policy"
