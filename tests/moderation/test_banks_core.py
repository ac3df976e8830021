"""Hash banks in the core: every upload hashed in its one decode, and the rule that joins bank
matches with the classifier (an allow-bank clears it; the most severe of the rest wins)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pytest
import yaml
from PIL import Image

from moderation import Moderator
from moderation.banks import BankMatch, with_matches
from moderation.decision import Decision
from moderation.hashing import UploadHashes, hamming, pdq_of
from moderation.policy import Action, parse_policy
from tests.fakes import HAND_POLICY, HAND_TEXTS, FakeEncoder, image_bytes


def photo(seed: int = 3, size: tuple[int, int] = (1600, 1200)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 40, size[0] // 40, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class Bank:
    """A stand-in for the decision log's banks: one bank, its PDQ hashes, an action."""

    action: str
    pdqs: list[str]
    distance: int = 31
    asked: list[UploadHashes] = field(default_factory=list)

    def match(self, hashes: UploadHashes, frame_indices: list[int]) -> list[BankMatch]:
        self.asked.append(hashes)
        found = []
        for frame, h in zip(frame_indices, hashes.frames, strict=True):
            for pdq in self.pdqs:
                d = hamming(h.pdq, pdq)
                if d <= self.distance:
                    found.append(BankMatch("known", self.action, "pdq", pdq, d, frame))  # type: ignore[arg-type]
        return found


def decision(action: Action) -> Decision:
    return Decision(action, {}, [])


def match(action: str) -> BankMatch:
    return BankMatch("b-" + action, action, "pdq", "0" * 64, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("classifier", "banks", "expected"), [
    (Action.BLOCK, ["allow"], Action.ALLOW),  # a known false positive is cleared
    (Action.ALLOW, ["block"], Action.BLOCK),
    (Action.FLAG, ["review"], Action.REVIEW),
    (Action.BLOCK, ["flag"], Action.BLOCK),  # a milder bank does not soften the classifier
    (Action.BLOCK, ["allow", "block"], Action.BLOCK),  # a block-bank beats an allow-bank
    (Action.REVIEW, ["allow", "flag"], Action.FLAG),
    (Action.BLOCK, [], Action.BLOCK),
])
def test_the_rule_that_joins_banks_and_classifier(classifier: Action, banks: list[str],
                                                  expected: Action) -> None:
    joined = with_matches(decision(classifier), [match(a) for a in banks])
    assert joined.action is expected
    assert [m.action for m in joined.matches] == banks


def test_every_upload_is_hashed_in_its_decode_and_matched_through_the_moderator() -> None:
    policy = parse_policy(yaml.safe_dump(HAND_POLICY))
    moderator = Moderator(policy, FakeEncoder(dict(HAND_TEXTS), {(128, 128, 128): np.array(
        [-1, -1, -1], np.float32) / np.sqrt(3)}))
    data = photo()
    full = pdq_of(Image.open(io.BytesIO(data)).convert("RGB"))
    decoded = moderator.decode(data)
    assert len(decoded.hashes) == 1 and decoded.sha256 is not None
    assert hamming(decoded.hashes[0].pdq, full.pdq) <= 16  # drafted at 512: close to full

    bank = Bank("block", [full.pdq])
    [result] = moderator.moderate_decoded([decoded], banks=bank)
    assert result.decision is not None and result.decision.action is Action.BLOCK
    assert result.hashes is not None and result.hashes.sha256 == decoded.sha256
    out = result.to_dict()
    assert out["action"] == "block" and out["matches"][0]["bank"] == "known"
    assert out["matches"][0]["distance"] <= 16 and out["triggered"] == []

    unrelated = moderator.moderate([photo(seed=99)], banks=bank)
    assert unrelated[0].decision is not None and unrelated[0].decision.matches == []


def test_hashing_can_be_turned_off() -> None:
    policy = parse_policy(yaml.safe_dump(HAND_POLICY))
    moderator = Moderator(policy, FakeEncoder(dict(HAND_TEXTS), {(0, 0, 0): np.array(
        [1, 0, 0], np.float32)}), hashes=False)
    decoded = moderator.decode(image_bytes((0, 0, 0), "JPEG"))
    assert decoded.hashes == () and decoded.sha256 is not None
