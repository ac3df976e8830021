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

from tests.fakes import (
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
    ({"json": {"policy": "x", "colour": 1}}, 400, "invalid_field",
     "unknown field 'colour'; accepted: policy, since"),
    ({"json": {"since": "1h"}}, 400, "missing_field", "field 'policy' is required"),
    ({"json": {"policy": "name: x", "since": "yesterday"}}, 400, "invalid_field",
     "field 'since' is not a time"),
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


# --- hostile proposals: a 4xx with a short answer, never a 500 -----------------------------


def nested_anchors(levels: int) -> str:
    """Each anchor aliases the one below ten times (10**levels strings, in a few KB)."""
    text = "a0: &a0 [" + ", ".join(["lol"] * 10) + "]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    return text


HOSTILE = {
    "control character": ("name: a\x03b\n", "invalid_policy", "unacceptable character #x0003"),
    "2,000 levels deep": ("name: " + "[" * 2000 + "]" * 2000, "policy_too_large",
                          "nested more than 32 levels deep"),
    "nested anchors": (nested_anchors(7), "policy_too_large",
                       "more than 100,000 values once its aliases are expanded"),
    "50 MiB": ("#" * (50 << 20), "policy_too_large", "the limit is 1,048,576"),
    "201 categories": (yaml.safe_dump(dict(HAND_POLICY, categories={
        f"c{i}": {} for i in range(201)})), "policy_too_large", "201 categories"),
}


@pytest.mark.parametrize(("text", "code", "says"), HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_proposal_is_a_short_422_on_the_dry_run(
        client: FlaskClient, text: str, code: str, says: str) -> None:
    r = client.post("/v1/policy/dry-run", data=text.encode(), content_type="application/yaml",
                    headers=ADMIN_H)
    if r.status_code == 413:  # the request body is over the service's own limit first
        return
    assert r.status_code == 422, r.get_data(as_text=True)[:500]
    assert len(r.get_data()) < 5_000 and "lol" not in r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == code and says in "\n".join(error["faults"])


@pytest.mark.parametrize(("text", "code", "says"), [
    pytest.param(*HOSTILE[k], id=k) for k in ("control character", "2,000 levels deep",
                                              "nested anchors")])
def test_a_hostile_policy_file_is_a_422_on_reload(
        client: FlaskClient, policy_path: Path, text: str, code: str, says: str) -> None:
    before = client.get("/v1/policy").get_json()["version"]
    policy_path.write_text(text)
    r = client.post("/v1/policy/reload", headers=ADMIN_H)
    assert r.status_code == 422, r.get_data(as_text=True)[:500]
    assert says in "\n".join(r.get_json()["error"]["faults"])
    assert client.get("/v1/policy").get_json()["version"] == before


@pytest.mark.parametrize(("text", "code", "says"), [
    pytest.param(*HOSTILE[k], id=k) for k in ("control character", "2,000 levels deep",
                                              "nested anchors")])
def test_a_hostile_proposal_is_a_422_page_in_the_lab(
        client: FlaskClient, text: str, code: str, says: str) -> None:
    assert client.get(f"/dashboard/lab?token={ADMIN}").status_code == 200
    r = client.post("/dashboard/lab", data={"policy": text, "since": "7d", "limit": "20"},
                    headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 422, r.get_data(as_text=True)[:500]
    page = r.get_data(as_text=True)
    assert code in page and says in page
    assert page.count("lol") == text.count("lol")  # the form keeps the text; nothing more


@pytest.mark.parametrize("path", ["../../../../etc/passwd", "../../../../etc/no-such-file",
                                  "/etc/passwd"])
def test_a_proposed_checkpoint_outside_the_policy_folder_is_refused_alike(
        client: FlaskClient, policy_path: Path, path: str) -> None:
    text = yaml.safe_dump(dict(HAND_POLICY, model={"name": "fake", "pretrained": path}))
    r = client.post("/v1/policy/dry-run", data=text, content_type="application/yaml",
                    headers=ADMIN_H)
    assert r.status_code == 422, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "invalid_policy"
    assert error["faults"] == [f"proposed policy: model.pretrained: {path!r} is outside the "
                               "policy's folder: a proposed policy may only name a file (or "
                               "export folder) by a relative path that stays inside it, or a "
                               "pretrained tag"]
    assert str(policy_path.parent) not in r.get_data(as_text=True)


def test_a_model_mismatch_names_a_checkpoint_by_its_path_in_the_folder(
        client: FlaskClient, policy_path: Path) -> None:
    (policy_path.parent / "models").mkdir()
    (policy_path.parent / "models" / "w.pt").write_bytes(b"x")
    text = yaml.safe_dump(dict(HAND_POLICY, model={"name": "fake", "pretrained": "models/w.pt"}))
    r = client.post("/v1/policy/dry-run", data=text, content_type="application/yaml",
                    headers=ADMIN_H)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "model_mismatch"
    message = r.get_json()["error"]["message"]
    assert "names model fake/models/w.pt, but" in message
    assert str(policy_path.parent) not in message


# --- a proposal's new prompts: bounded, and kept out of the shared cache -------------------


@pytest.fixture
def shared_app(fake_encoder: FakeEncoder, policy_path: Path, tmp_path: Path) -> Flask:
    """The app with the text-embedding cache a server has: the log's, over a folder."""
    from decisionlog import SharedEmbeddingCache, migrate
    from moderation import Moderator
    from moderation.policy import parse_policy
    from service.app import create_app

    url = f"sqlite:///{policy_path.parent / 'decisions.sqlite3'}"
    migrate(url)
    cache = SharedEmbeddingCache.with_folder(url, tmp_path / "cache")
    moderator = Moderator(parse_policy(policy_path.read_text()), fake_encoder, cache)
    return create_app({"POLICY": str(policy_path), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
                       "DATABASE_URL": url}, moderator=moderator)


def test_a_dry_run_s_new_prompts_enter_the_shared_cache_only_once_activated(
        shared_app: Flask, fake_encoder: FakeEncoder, policy_path: Path, tmp_path: Path
        ) -> None:
    from decisionlog import SharedEmbeddingCache

    client = shared_app.test_client()
    moderate_all(client, shared_app)
    fake_encoder.texts.update({"a knife": unit(0, -1, 1), "the knife": unit(-1, 1, 1)})
    proposed = proposal(terms=["gun", "rifle", "knife"])
    fake_encoder.encoded_texts.clear()
    url = shared_app.extensions["decisions"][0].url
    in_log = SharedEmbeddingCache(url)  # the log's table alone

    def cached() -> set[str]:
        return set(in_log.get(fake_encoder.identity, ["a knife", "the knife"]))

    files = set((tmp_path / "cache").rglob("*.npy"))
    for _ in range(2):
        dry_run(client, proposed)
    assert fake_encoder.encoded_texts == ["a knife", "the knife"] * 2  # not cached between
    assert cached() == set() and set((tmp_path / "cache").rglob("*.npy")) == files

    policy_path.write_text(yaml.safe_dump(proposed, sort_keys=False))
    assert client.post("/v1/policy/reload", headers=ADMIN_H).status_code == 200
    assert cached() == {"a knife", "the knife"}
    dry_run(client, proposed)
    assert fake_encoder.encoded_texts == ["a knife", "the knife"] * 3  # the reload's


def test_a_dry_run_with_too_many_new_prompts_is_refused_before_encoding(
        shared_app: Flask, fake_encoder: FakeEncoder, policy_path: Path) -> None:
    from moderation import ModerationError, PolicyLimits
    from service.parsing import DryRunRequest
    from service.policy import run_dry_run

    app, client = shared_app, shared_app.test_client()
    moderate_all(client, app)
    fake_encoder.texts.update({"a knife": unit(0, -1, 1), "the knife": unit(-1, 1, 1)})
    text = yaml.safe_dump(proposal(terms=["gun", "rifle", "knife"]), sort_keys=False)
    fake_encoder.encoded_texts.clear()
    holder, store = app.extensions["moderation"], app.extensions["decisions"][0]
    with app.app_context():
        with pytest.raises(ModerationError) as info:
            run_dry_run(holder, store, DryRunRequest(policy=text),
                        limits=PolicyLimits(max_new_prompts=1))
        assert (info.value.status, info.value.code) == (422, "policy_too_large")
        assert "has 2 prompts (terms and exceptions × templates) that were never encoded " \
               "with fake/hand-made; the limit is 1" in info.value.message
        assert fake_encoder.encoded_texts == []
        report = run_dry_run(holder, store, DryRunRequest(policy=text),
                             limits=PolicyLimits(max_new_prompts=2))
        assert report.decisions == len(IMAGES)
        # a stored version to compare with spends the same budget
        sword = yaml.safe_dump(proposal(terms=["gun", "sword"]), sort_keys=False)
        fake_encoder.texts.update({"a sword": unit(1, 1, 0), "the sword": unit(1, 0, 1)})
        active = holder.current().policy.version
        # a version that was active, but never on this server: its prompts were not encoded
        holder.policies.activate(version="v-sword", name="hand", source="policy.yaml",
                                 text=sword)
        holder.policies.activate(version=active, name="hand", source="policy.yaml",
                                 text=policy_path.read_text())
        with pytest.raises(ModerationError, match="has 2 prompts .* the limit is 0"):
            run_dry_run(holder, store, DryRunRequest(policy=text, against="v-sword"),
                        limits=PolicyLimits(max_new_prompts=2))
