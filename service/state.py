"""The active policy of a worker, swapped atomically, and followed across workers and
replicas through the decision log (:class:`decisionlog.PolicyLog`)."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from pathlib import Path

from decisionlog import Activation, PolicyLog
from moderation import ModerationError, Moderator, PolicyError
from moderation.policy import Policy, PolicyLimits, parse_policy

log = logging.getLogger(__name__)

__all__ = ["ModelOccupancy", "PolicyHolder"]


def read_policy_text(path: Path) -> str:
    """The file's text exactly (no newline translation): the log keeps it byte for byte."""
    return path.read_bytes().decode("utf-8")


class PolicyHolder:
    """Holds the moderator a request should use, and follows the log's latest activation.

    ``current()`` is what a request calls once, at its start: a request in flight keeps the
    moderator (and so the policy) it started with while a reload swaps in a new one.

    A reload (on any worker of any replica) validates the file, encodes its prompts (into the
    text-embedding cache the replicas share), records the text and an activation in the log,
    swaps the new policy in, and only then answers. Every request first reads the id of the
    latest activation (one indexed read); if it is newer than the one its worker follows, it
    waits until its worker has switched, so that once a reload has answered, every request
    that starts afterwards, on any worker of any replica, is decided with the new policy.
    Switching reads the text from the log and its embeddings from the shared cache (no
    encoding), and is normally done before any request needs it by each worker's follower
    thread (:meth:`follow_in_background`).

    When the log cannot be read, requests keep the policy they have (checked again a second
    later) rather than failing.
    """

    def __init__(
        self, moderator: Moderator, policy_path: str | Path | None,
        policies: PolicyLog | None = None, limits: PolicyLimits | None = None,
    ) -> None:
        self._moderator = moderator
        self.limits = limits or PolicyLimits()  # what a policy file or stored text may cost
        self.policy_path = Path(policy_path) if policy_path is not None else None
        self.policies = policies
        self._lock = threading.Lock()
        self._following: int | None = None  # the activation this worker serves
        self._retry_at = 0.0  # after a failed read of the log, when to read it again

    # --- start ---------------------------------------------------------------------------

    def start(self, *, given: bool = False) -> Activation | None:
        """Take part in the log's activations: a policy file whose version the log has
        never had is activated (a new edit, then a restart); otherwise this worker follows the
        latest activation, which a restart with an older copy of the file does not undo.

        The file is read again here: it may have been edited (and reloaded by another worker)
        while this one was loading its model. A moderator ``given`` by the caller with another
        policy than the file's (an embedding application, a test) is served as it is, outside
        the activations."""
        if self.policies is None or self.policy_path is None:
            return None
        text = read_policy_text(self.policy_path)
        policy = parse_policy(text, source=self.policy_path.name,
                              base_dir=self.policy_path.parent, limits=self.limits)
        if given and policy.version != self._moderator.policy.version:
            log.warning("the moderator's policy %s is not the policy file %s: serving it "
                        "without following the log's activations",
                        self._moderator.policy.version, self.policy_path)
            self.policies = None
            return None
        activation, activated = self.policies.start(
            version=policy.version, name=policy.name, source=self.policy_path.name, text=text,
        )
        with self._lock:
            if activated:
                if policy != self._moderator.policy:
                    self._moderator = self._moderator.with_policy(policy)
                self._following = activation.id
                return activation
            if activation.version != policy.version:
                log.warning(
                    "the policy file %s has version %s, which was active before; the log's "
                    "latest activation is %s (%s on %s): serving that. POST /v1/policy/reload "
                    "activates the file.", self.policy_path, policy.version,
                    activation.version, activation.reason, activation.host,
                )
            self._follow(activation.id)
        return activation

    # --- requests ------------------------------------------------------------------------

    def current(self) -> Moderator:
        latest = self._latest()
        if latest is not None and latest != self._following:
            with self._lock:  # wait for the switch (ours, or the follower thread's)
                if latest != self._following:
                    self._follow(latest)
        return self._moderator

    def _latest(self) -> int | None:
        if self.policies is None or time.monotonic() < self._retry_at:
            return None
        try:
            return self.policies.latest_id()
        except Exception as e:  # the log is down: serve what we have
            self._retry_at = time.monotonic() + 1.0
            log.warning("cannot read the active policy from the decision log (%s); "
                        "serving policy %s", e, self._moderator.policy.version)
            return None

    def follow_in_background(self, interval: float = 0.25) -> threading.Thread:
        """Start a daemon thread that switches to a newer activation within ``interval``
        seconds, so that requests seldom wait for it. It ends with :meth:`stop_following`, or
        once nothing else holds this object (an app that is gone: tests build hundreds)."""
        stop = self._stop_following = threading.Event()
        me = weakref.ref(self)

        def run() -> None:
            while not stop.wait(interval):
                holder = me()
                if holder is None:
                    return
                try:
                    holder.current()
                except Exception:  # never stop following
                    log.exception("following the policy activations failed")
                del holder

        thread = threading.Thread(target=run, name="policy-follower", daemon=True)
        thread.start()
        return thread

    def stop_following(self) -> None:
        """End the thread :meth:`follow_in_background` started (if any)."""
        stop = getattr(self, "_stop_following", None)
        if stop is not None:
            stop.set()

    # --- reload --------------------------------------------------------------------------

    def reload(self) -> Moderator:
        """Read the policy file again and activate it; raise (keeping the old policy) if it
        is not valid."""
        if self.policy_path is None:
            raise RuntimeError("this service was not started from a policy file")
        with self._lock:
            keeps = "the previous policy keeps serving"
            try:
                text = read_policy_text(self.policy_path)
                policy = parse_policy(
                    text, source=self.policy_path.name, base_dir=self.policy_path.parent,
                    limits=self.limits,
                )
                moderator = self._moderator.with_policy(policy)  # encodes new prompts
            except PolicyError as e:
                raise type(e)(f"the policy file is not valid; {keeps}", faults=e.faults) from e
            except ModerationError as e:  # e.g. thresholds calibrated with another model
                raise PolicyError(f"{e}; {keeps}") from e
            except (OSError, UnicodeDecodeError) as e:
                raise PolicyError(f"cannot read the policy file ({type(e).__name__}); "
                                  f"{keeps}") from e
            if self.policies is not None:
                activation = self.policies.activate(
                    version=policy.version, name=policy.name, source=self.policy_path.name,
                    text=text, reason="reload",
                )
                self._following = activation.id
            self._moderator = moderator
        log.info("policy %s version %s is active", policy.name, policy.version)
        return self._moderator

    def _follow(self, activation_id: int) -> None:
        """Switch to the policy of the latest activation (called under the lock)."""
        assert self.policies is not None
        try:
            latest = self.policies.latest()
            if latest is None:
                return
            # even for the same version: the name or descriptions may differ
            self._moderator = self._moderator.with_policy(self._policy_of(latest))
            self._following = latest.id
            log.info("followed activation %d (%s on %s): policy version %s is active",
                     latest.id, latest.reason, latest.host, latest.version)
        except Exception:  # keep serving the policy we have; try again on the next check
            log.exception("could not follow policy activation %d", activation_id)
            self._retry_at = time.monotonic() + 1.0

    def _policy_of(self, activation: Activation) -> Policy:
        found = self.stored_policy(activation.version)
        if found is None:
            raise LookupError(f"the log has no text for policy version {activation.version}")
        return found

    def stored_policy(self, version: str) -> Policy | None:
        """The policy ``version`` was (last) activated with, read from the log (a relative
        checkpoint path resolved beside this server's policy file, as the file's own);
        ``None`` when the log never had it. Raises :class:`PolicyError` if it no longer
        validates."""
        recorded = self.policies.text(version) if self.policies is not None else None
        if recorded is None:
            return None
        base_dir = self.policy_path.parent if self.policy_path is not None else None
        return parse_policy(recorded.text, source=recorded.source, base_dir=base_dir,
                            limits=self.limits)


class ModelOccupancy:
    """How many of a server's workers are running the model: a counter in a small file that
    all of them share, changed under ``flock`` (a few microseconds per forward pass).

    A worker that dies while counted in leaves the count high: the only effect is that lone
    batches keep to their worker's share of threads, never a wrong result.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._fd = fd

    def _add(self, delta: int) -> int:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self._fd, 8, 0)
            count = max(0, int.from_bytes(raw, "little") if len(raw) == 8 else 0) + delta
            os.pwrite(self._fd, max(0, count).to_bytes(8, "little"), 0)
            return count
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def enter(self) -> int:
        return self._add(1) - 1

    def leave(self) -> None:
        self._add(-1)
