"""Views through the app: an upload cut into crops by its policy is decided on the crop that
holds a small marker, the response and the stored record name the view (frame, crop box), and
the policy lab re-decides stored decisions with their crops."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import yaml
from flask.testing import FlaskClient

from moderation import Moderator
from moderation.policy import parse_policy
from service.app import create_app
from tests.fakes import MARKER_POLICY, MarkerEncoder, marker_photo
from tests.service.conftest import ADMIN, READER

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
READER_H = {"Authorization": f"Bearer {READER}"}
MARKER = (900, 600, 1060, 760)


def cropped_policy(**marker: Any) -> dict[str, Any]:
    data = copy.deepcopy(MARKER_POLICY)
    data["views"] = {"crops": "2x2", "overlap": 0.2, "min_side": 256}
    data["categories"]["marker"].update(marker)
    return data


def make_client(tmp_path: Path) -> tuple[Any, FlaskClient]:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(cropped_policy(), sort_keys=False))
    app = create_app(
        {"POLICY": str(path), "ADMIN_TOKEN": ADMIN, "READER_TOKEN": READER,
         "DATABASE_URL": f"sqlite:///{tmp_path / 'decisions.sqlite3'}"},
        moderator=Moderator(parse_policy(path.read_text()), MarkerEncoder()),
    )
    return app, app.test_client()


def test_a_small_marker_is_blocked_through_crops_and_every_surface_names_the_crop(
        tmp_path: Path) -> None:
    app, client = make_client(tmp_path)
    r = client.post("/v1/moderate", data={"image": [(io.BytesIO(marker_photo()), "a.jpg")],
                                          "id": ["photo"]},
                    content_type="multipart/form-data")
    assert r.status_code == 200, r.get_data(as_text=True)
    [result] = r.get_json()["results"]
    assert result["action"] == "block" and result["triggered"] == ["marker"]
    assert result["frames_scored"] == 1 and result["views_scored"] == 5
    view = result["categories"]["marker"]["view"]
    assert view["frame"] == 0 and view["time"] is None
    left, top, right, bottom = view["box"]
    assert left <= MARKER[0] and top <= MARKER[1] and right >= MARKER[2] and bottom >= MARKER[3]
    app.extensions["decisions"][1].flush()

    stored = client.get(f"/v1/decisions/{result['decision_id']}", headers=READER_H)
    assert stored.status_code == 200, stored.get_data(as_text=True)
    record = stored.get_json()
    assert record["categories"]["marker"]["view"] == view
    assert sorted(record["frames"]) == [-4, -3, -2, -1, 0]
    assert len(record["views"]) == 5 and record["views"][0] == {"frame": 0, "time": None,
                                                                 "box": None}
    assert view in record["views"]

    # the lab re-decides the stored decision with its crops: without them it is allowed,
    # and the "before" side names the crop it was blocked on
    without = cropped_policy(crops=False)
    r = client.post("/v1/policy/dry-run", data=yaml.safe_dump(without, sort_keys=False),
                    content_type="application/yaml", headers=ADMIN_H,
                    query_string={"limit": 10})
    assert r.status_code == 200, r.get_data(as_text=True)
    report = r.get_json()
    [changed] = report["changed"]
    assert changed["before"]["action"] == "block" and changed["after"]["action"] == "allow"
    assert changed["before"]["categories"]["marker"]["view"] == view
    assert changed["after"]["categories"]["marker"]["view"]["box"] is None
