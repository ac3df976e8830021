"""The platform hooks' tests run against the service's test app (the hand-made encoder:
a red image is blocked as weapons, a grey one allowed), served over real HTTP on loopback.
Slow ones (a virtual environment with the platform's own software) run where
MODERATION_TEST_PLATFORMS=1 (.ci/services sets it)."""

from tests.service.conftest import ADMIN, READER, app, make_app, policy_path

__all__ = ["ADMIN", "READER", "app", "make_app", "policy_path"]
