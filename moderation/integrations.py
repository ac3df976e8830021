"""What an integration does with a decision: one policy for every platform hook (pict-rs,
``moderation check`` for matrix-content-scanner, …), so that they agree.

* an action in ``reject`` (default: block) rejects the upload;
* ``review`` decides what a review action does: ``accept`` (the upload goes through and waits
  in the review queue) or ``reject``;
* ``fail_mode`` decides what happens when the service cannot decide (not ready, overloaded,
  an internal error, a timeout): ``open`` accepts, ``closed`` rejects. Always logged and
  counted by the caller. A file the decoder refuses is a decision (rejected), not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["IntegrationPolicy", "Verdict"]

FailMode = Literal["open", "closed"]


@dataclass(frozen=True)
class Verdict:
    """What an integration answers: ``accept``, and the reason a user can be shown."""

    accept: bool
    reason: str


@dataclass(frozen=True)
class IntegrationPolicy:
    reject: tuple[str, ...] = ("block",)
    review: Literal["accept", "reject"] = "accept"
    fail_mode: FailMode = "closed"

    @classmethod
    def parse(cls, reject: str = "block", review: str = "accept",
              fail_mode: str = "closed") -> IntegrationPolicy:
        """From settings' text (``reject``: comma-separated actions). Raises ``ValueError``
        saying what is accepted."""
        actions = tuple(a.strip() for a in reject.split(",") if a.strip())
        bad = [a for a in actions if a not in ("flag", "review", "block")]
        if bad:
            raise ValueError(f"integration reject actions must be among flag, review, block; "
                             f"got {', '.join(bad)}")
        if review not in ("accept", "reject"):
            raise ValueError(f"integration review must be accept or reject; got {review!r}")
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"integration fail mode must be open or closed; got {fail_mode!r}")
        return cls(actions, review, fail_mode)  # type: ignore[arg-type]

    def of_action(self, action: str, triggered: list[str]) -> Verdict:
        """The verdict on a decision's action (``triggered``: its categories, for the
        reason)."""
        why = f" ({', '.join(triggered)})" if triggered else ""
        if action == "review" and self.review == "reject":
            return Verdict(False, f"held for review{why}")
        if action in self.reject:
            return Verdict(False, f"{action}{why}")
        if action == "review":
            return Verdict(True, f"accepted, queued for review{why}")
        return Verdict(True, f"{action}{why}")

    def of_refusal(self, code: str, message: str) -> Verdict:
        """A file the decoder refuses: rejected (it is a decision, not a failure)."""
        return Verdict(False, f"not an accepted file: {code}: {message}")

    def of_failure(self, what: str) -> Verdict:
        """The service could not decide: the fail mode's verdict."""
        if self.fail_mode == "open":
            return Verdict(True, f"accepted without a decision (fail open): {what}")
        return Verdict(False, f"rejected without a decision (fail closed): {what}")
