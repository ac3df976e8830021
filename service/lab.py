"""The policy lab behind ``POST /v1/policy/dry-run`` and the lab page: a proposed policy's
text → a dry-run against the active policy (or a stored version), with this server's encoder
and the decision log's stored embeddings. Nothing is activated or recorded."""

from __future__ import annotations

from decisionlog import DecisionStore
from decisionlog.lab import DryRun, dry_run
from moderation import ModerationError, PolicyError
from moderation.policy import Policy, parse_policy

from .parsing import DryRunRequest, RequestError, time_field
from .state import PolicyHolder

__all__ = ["run_dry_run", "stored_policy"]


def _model(policy: Policy) -> str:
    return f"{policy.model.name}/{policy.model.pretrained}"


def stored_policy(holder: PolicyHolder, version: str) -> Policy:
    """A version the log keeps, parsed; a 404 when the log never had it, a 422 (with the
    faults) when its text no longer validates here (e.g. its checkpoint file is gone)."""
    try:
        stored = holder.stored_policy(version)
    except PolicyError as e:
        raise RequestError(422, "invalid_policy", f"stored policy version {version!r} no "
                           "longer validates on this server", faults=e.faults) from e
    if stored is None:
        raise RequestError(404, "not_found", f"no policy version {version!r} was ever active")
    return stored


def run_dry_run(holder: PolicyHolder, store: DecisionStore, request: DryRunRequest) -> DryRun:
    """Raises :class:`RequestError`: 422 for a policy that is not valid or is for another
    model, 404 for an unknown ``against`` version, 400 for a bad time."""
    active = holder.current()
    since, until = time_field("since", request.since), time_field("until", request.until)
    base_dir = holder.policy_path.parent if holder.policy_path is not None else None
    try:
        proposed = parse_policy(request.policy, source="proposed policy", base_dir=base_dir)
    except PolicyError as e:
        raise RequestError(422, "invalid_policy", "the proposed policy is not valid",
                           faults=e.faults) from e
    before, before_source = active.policy, "active policy"
    if request.against:
        before = stored_policy(holder, request.against)
        before_source = f"stored version {request.against}"
    for what, policy in (("the proposed policy", proposed), (before_source, before)):
        if policy.model != active.policy.model:
            raise RequestError(
                422, "model_mismatch",
                f"{what} names model {_model(policy)}, but the stored embeddings (and this "
                f"server's encoder) belong to model {active.encoder.identity} "
                f"({_model(active.policy)}): a dry-run re-scores stored embeddings, which "
                "only works with the model that made them",
            )
    try:
        after = active.with_policy(proposed)  # encodes the new prompts once (the cache)
        current = active.with_policy(before) if before is not active.policy else active
        return dry_run(
            store, current.scorer(), after.scorer(), model=active.encoder.identity,
            since=since, until=until, limit=request.limit, before_source=before_source,
            after_source="proposed policy",
        )
    except ModerationError as e:  # thresholds calibrated with another model
        raise RequestError(422, "model_mismatch", str(e)) from e
