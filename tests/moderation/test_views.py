"""Views: crops of each frame for small objects, decided by the one scorer (a category's score
is its maximum over the views it takes), named in every result, and what they cost."""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from calibration.labels import LabelledImage
from calibration.run import image_scores
from moderation import Moderator
from moderation.errors import PolicyError
from moderation.images import decode_image
from moderation.policy import parse_policy
from moderation.scorer import Scorer
from moderation.views import CropGrid, View, crop_boxes, draft_size_for
from tests.fakes import MARKER_POLICY, MarkerEncoder, marker_photo, unit

MARKER = (900, 600, 1060, 760)


def policy_with(views: dict[str, Any] | None = None, **category: Any) -> Any:
    data = copy.deepcopy(MARKER_POLICY)
    if views is not None:
        data["views"] = views
    data["categories"]["marker"].update(category)
    return parse_policy(yaml.safe_dump(data))


def moderator(views: dict[str, Any] | None = None, **category: Any) -> Moderator:
    return Moderator(policy_with(views, **category), MarkerEncoder())


def contains(box: list[int] | tuple[int, ...], inner: tuple[int, int, int, int]) -> bool:
    return box[0] <= inner[0] and box[1] <= inner[1] and box[2] >= inner[2] and (
        box[3] >= inner[3])


# --- the grid -------------------------------------------------------------------------------


def test_a_2x2_grid_covers_the_frame_and_neighbours_share_the_overlap() -> None:
    boxes = crop_boxes(1200, 900, CropGrid(2, 2, overlap=0.2, min_side=100))
    assert len(boxes) == 4
    (a, b, c, d) = boxes  # row by row
    assert a[:2] == (0, 0) and d[2:] == (1200, 900)
    side_x, side_y = 1200 / 1.8, 900 / 1.8
    assert a[2] == round(side_x) and a[3] == round(side_y)
    assert b[0] == round(side_x * 0.8) and c[1] == round(side_y * 0.8)
    # the shared strip is 20 % of a crop's side
    assert (a[2] - b[0]) == pytest.approx(0.2 * side_x, abs=1)
    covered = np.zeros((900, 1200), bool)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_no_crops_below_the_minimum_side_and_none_for_1x1() -> None:
    assert crop_boxes(400, 300, CropGrid(2, 2, overlap=0.2, min_side=256)) == []
    assert crop_boxes(4000, 3000, CropGrid(1, 1)) == []
    assert len(crop_boxes(3000, 600, CropGrid(3, 1, min_side=256))) == 3


def test_a_jpeg_is_drafted_at_the_size_its_crops_need() -> None:
    assert draft_size_for(224, None) == 224
    assert draft_size_for(224, CropGrid(2, 2)) == 448
    assert draft_size_for(224, CropGrid(3, 2)) == 672


@pytest.mark.parametrize("grid", ["5x5", "2x", "0x2", "two", "2x2x2"])
def test_a_bad_grid_is_refused_saying_what_is_accepted(grid: str) -> None:
    with pytest.raises(PolicyError, match="columns x rows, each 1 to 4"):
        policy_with({"crops": grid})


def test_a_category_cannot_take_crops_the_policy_does_not_cut() -> None:
    with pytest.raises(PolicyError, match="views.crops"):
        policy_with(None, crops=True)


def test_views_change_the_version_only_when_there_are_crops() -> None:
    plain = policy_with()
    assert policy_with({"crops": "none"}).version == plain.version
    assert policy_with({"crops": "none"}).scores_version == plain.scores_version
    cropped = policy_with({"crops": "2x2"})
    assert cropped.version != plain.version and cropped.scores_version != plain.scores_version
    assert policy_with({"crops": "2x2"}, crops=False).version != cropped.version
    assert cropped.views_cost("marker") == 5 and cropped.views_cost() == 5
    assert policy_with({"crops": "2x2"}, crops=False).views_cost("marker") == 1


# --- decoding ---------------------------------------------------------------------------------


def test_crops_are_cut_before_the_resize_with_boxes_in_source_pixels() -> None:
    grid = CropGrid(2, 2, 0.2, 256)
    decoded = decode_image(marker_photo(), draft_size=224, crops=grid)
    assert len(decoded.frames) == 1 and len(decoded.crops) == 4
    assert [c.box for c in decoded.crops] == crop_boxes(1200, 900, grid)
    # each crop keeps at least the model's size on its short side (not a 224-px image cut up)
    assert all(min(c.image.size) >= 224 for c in decoded.crops)
    views = decoded.views()
    assert views[0] == View(0) and all(v.is_crop for v in views[1:])
    assert len(decoded.view_images()) == 5


def test_crop_boxes_are_in_the_upright_image() -> None:
    """EXIF orientation 6 (turned 90°): the boxes are those of the upright 900x1200 image."""
    image = Image.new("RGB", (1200, 900), (128, 128, 128))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), draft_size=224, crops=CropGrid(2, 2, 0.2, 256))
    assert [c.box for c in decoded.crops] == crop_boxes(900, 1200, CropGrid(2, 2, 0.2, 256))


def test_a_thumbnail_is_not_cut() -> None:
    decoded = decode_image(marker_photo((300, 200), (200, 120, 240, 160)), draft_size=224,
                           crops=CropGrid(2, 2, 0.2, 256))
    assert decoded.crops == () and len(decoded.views()) == 1


def test_every_sampled_frame_of_an_animation_is_cut() -> None:
    frames = [Image.new("RGB", (600, 600), c) for c in ((128, 128, 128), (255, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue(), draft_size=64, crops=CropGrid(2, 2, 0.2, 100))
    assert len(decoded.frames) == 2 and len(decoded.crops) == 8
    assert [c.position for c in decoded.crops] == [0] * 4 + [1] * 4
    assert [v.frame for v in decoded.views()] == [0, 1] + [0] * 4 + [1] * 4


# --- deciding -----------------------------------------------------------------------------


def test_a_small_marker_is_found_through_crops_and_not_without() -> None:
    photo = marker_photo()
    [without] = moderator().moderate([photo])
    assert without.decision is not None and without.decision.action.value == "allow"
    assert without.frames_scored == 1 and len(without.views) == 1

    [with_crops] = moderator({"crops": "2x2", "min_side": 256}).moderate([photo])
    decision = with_crops.decision
    assert decision is not None and decision.action.value == "block"
    assert decision.triggered == ["marker"]
    marker = decision.categories["marker"]
    assert marker.score > 0.07 > without.decision.categories["marker"].score
    assert marker.view is not None and marker.view.box is not None
    assert contains(marker.view.box, MARKER), marker.view
    out = with_crops.to_dict()
    assert out["views_scored"] == 5 and out["frames_scored"] == 1
    assert out["categories"]["marker"]["view"] == {"frame": 0, "time": None,
                                                   "box": list(marker.view.box)}
    # stored keys: the frame, then its crops as -1 - k
    assert with_crops.frames == (0, -1, -2, -3, -4)
    assert with_crops.embeddings is not None and len(with_crops.embeddings) == 5


def test_a_category_that_takes_no_crops_keeps_to_the_whole_frames() -> None:
    [result] = moderator({"crops": "2x2"}, crops=False).moderate([marker_photo()])
    assert result.decision is not None and result.decision.action.value == "allow"
    marker = result.decision.categories["marker"]
    assert marker.view == View(0) and len(result.views) == 5  # cut for the policy, not used


def test_the_scorer_masks_crops_for_categories_that_take_none_in_every_path() -> None:
    """decide, scores (calibration) and assess (dry-runs) agree: with stored keys, a crop's
    row counts only for the categories that take crops."""
    cropped = policy_with({"crops": "2x2"}, crops=False)
    scorer = Scorer(cropped, Moderator(cropped, MarkerEncoder()).text)
    vectors = np.stack([unit(0.02, 0.98, 0), unit(0.5, 0.5, 0)]).astype(np.float32)
    keys = [0, -1]
    [decision] = scorer.decide([vectors], [keys])
    by_scores = scorer.scores([vectors], [keys])[0]
    assessed = scorer.assess(vectors, np.array([2]), keys=np.array(keys))
    marker = cropped_index = scorer.text.category_ids.index("marker")
    assert decision.categories["marker"].score == pytest.approx(by_scores[marker], abs=1e-6)
    assert assessed.score[0, cropped_index] == pytest.approx(by_scores[marker], abs=1e-6)
    assert by_scores[marker] < 0.05  # the crop's 0.7 is not this category's
    both = Scorer(policy_with({"crops": "2x2"}), scorer.text)
    assert both.scores([vectors], [keys])[0][marker] > 0.7
    # without keys, every row is a whole frame (what stored decisions before crops are)
    assert scorer.scores([vectors])[0][marker] > 0.7


def test_calibration_from_files_fits_on_the_crop_maximum_the_service_decides_with(
        tmp_path: Any) -> None:
    path = tmp_path / "marker.jpg"
    path.write_bytes(marker_photo())
    mod = moderator({"crops": "2x2"})
    scores, kept, left_out = image_scores(mod, [LabelledImage(path, frozenset({"marker"}))])
    assert kept == [0] and not left_out
    [result] = mod.moderate([path])
    assert result.decision is not None
    marker = mod.text.category_ids.index("marker")
    assert scores[0, marker] == pytest.approx(result.decision.categories["marker"].score,
                                              abs=1e-6)
    assert scores[0, marker] > 0.07


# --- videos: the persistence rule ------------------------------------------------------------


def persistent_scorer(frames: int, within_s: float, review_from: float | None = None) -> Scorer:
    policy = policy_with(None, persistence={"frames": frames, "within_s": within_s},
                         threshold={"value": 0.07, "review_from": review_from})
    return Scorer(policy, Moderator(policy, MarkerEncoder()).text)


def clip_vectors(crossing: list[bool]) -> np.ndarray:
    """One vector per sampled second: similarity ~0.5 where crossing, ~0.01 elsewhere."""
    return np.stack([unit(1, 1, 0) if c else unit(0.01, 1, 0) for c in crossing]).astype(
        np.float32)


def timed(n: int) -> list[View]:
    return [View(i, float(i)) for i in range(n)]


def test_persistence_fires_on_three_consecutive_crossing_frames_and_names_the_span() -> None:
    crossing = [False, False, True, True, True, False, False, False]
    [decision] = persistent_scorer(3, 2.0).decide([clip_vectors(crossing)], [timed(8)])
    marker = decision.categories["marker"]
    assert decision.action.value == "block" and marker.span == (2.0, 4.0)
    assert marker.to_dict()["span"] == [2.0, 4.0]
    assert marker.view == View(2, 2.0)  # the first of the equal maxima


def test_persistence_does_not_fire_on_two_scattered_crossing_frames() -> None:
    crossing = [True, False, False, False, True, False, False, False]
    [decision] = persistent_scorer(3, 2.0).decide([clip_vectors(crossing)], [timed(8)])
    marker = decision.categories["marker"]
    assert decision.action.value == "allow" and not marker.flagged and marker.span is None
    assert marker.score > marker.threshold  # the score is still the maximum: it says why
    # with a review band, a score over the threshold that did not persist goes to review
    [banded] = persistent_scorer(3, 2.0, review_from=0.05).decide(
        [clip_vectors(crossing)], [timed(8)])
    assert banded.action.value == "review"


def test_images_and_animations_keep_the_any_frame_rule() -> None:
    """No times: a persistence rule never stops an image (it could never hold)."""
    [decision] = persistent_scorer(3, 2.0).decide([clip_vectors([True])], [[View(0)]])
    assert decision.action.value == "block" and decision.categories["marker"].span is None


def test_persistence_changes_the_decision_version_not_the_scores_version() -> None:
    plain = policy_with()
    rule = policy_with(None, persistence={"frames": 3, "within_s": 5})
    assert rule.version != plain.version and rule.scores_version == plain.scores_version
    assert policy_with(None, persistence={"frames": 1, "within_s": 0}).version == plain.version
