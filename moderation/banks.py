"""Known-image hash banks beside the classifier: what a match is, and how matches join a
decision. The banks themselves (their hashes, their index) live above the core, in the
decision log; the core declares what it needs of them (:class:`HashMatcher`) and the caller
passes one in.

The rule: an upload's action is the classifier's, unless an **allow**-bank matched (a known
good image that keeps coming back as a false positive: it clears the classifier), then the
most severe of that and every other matched bank's action (a block-bank match blocks whatever
the classifier or an allow-bank said).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from .decision import Decision
from .hashing import UploadHashes
from .policy import Action

__all__ = ["BANK_ACTIONS", "BankMatch", "HashMatcher", "with_matches"]

BankAction = Literal["allow", "flag", "review", "block"]
BANK_ACTIONS: tuple[str, ...] = ("allow", "flag", "review", "block")


@dataclass(frozen=True)
class BankMatch:
    """One bank hash an upload matched: the bank and its action, the bank's hash (PDQ hex, or
    the SHA-256 of an exact copy), how far the upload's frame is from it (0 for SHA-256),
    which frame matched (its index in the file), and the hash's note and source."""

    bank: str
    action: BankAction
    kind: Literal["pdq", "sha256"]
    hash: str
    distance: int
    frame: int = 0
    note: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "action": self.action, "kind": self.kind, "hash": self.hash,
                "distance": self.distance, "frame": self.frame, "note": self.note,
                "source": self.source}


class HashMatcher(Protocol):
    """What the core needs of hash banks: every bank entry an upload's hashes match.

    ``hashes.frames[i]`` is the PDQ of the upload's ``frame_indices[i]``; a frame whose PDQ
    quality is under a bank's minimum is not matched against that bank. Results sorted by
    severity (most severe first), then distance."""

    def match(self, hashes: UploadHashes, frame_indices: list[int]) -> list[BankMatch]: ...


def with_matches(decision: Decision, matches: list[BankMatch]) -> Decision:
    """``decision`` (the classifier's) joined with the bank matches (see the module)."""
    if not matches:
        return decision
    action = decision.action
    if any(m.action == "allow" for m in matches):
        action = Action.ALLOW
    for m in matches:
        if m.action != "allow" and Action(m.action).severity > action.severity:
            action = Action(m.action)
    return replace(decision, action=action, matches=list(matches))
