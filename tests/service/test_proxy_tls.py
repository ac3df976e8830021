"""deploy/nginx-moderation.conf with TLS, in front of the real `moderation serve`: plain http
is sent to https, the dashboard cookie is Secure, forms from the page itself pass the Origin
check through the proxy; and without MODERATION_TRUSTED_PROXIES, no peer's X-Forwarded-Proto
is believed (not even 127.0.0.1's, which gunicorn believes by default)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.service.conftest import READER, TOKEN, Server, free_port

# starts a real server (gunicorn, nginx or Ray): left out of the quick loop
pytestmark = pytest.mark.server


def test_tls_in_front(start_server: Callable[..., Server], nginx_in_front: Callable[..., int],
                      tmp_path: Path) -> None:
    server = start_server(workers=1, MODERATION_TRUSTED_PROXIES="1")
    http_port = free_port()
    port = nginx_in_front(server.port, tls=True, http_port=http_port)
    base = f"https://127.0.0.1:{port}"
    certificate = str(tmp_path / "nginx" / "cert.pem")

    r = requests.get(f"{base}/dashboard?token={READER}", verify=certificate, timeout=10)
    assert r.status_code == 200
    cookie = r.headers["Set-Cookie"]
    assert "moderation_token=" in cookie and "; Secure" in cookie
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]

    admin = {"Authorization": f"Bearer {TOKEN}"}
    own = requests.post(f"{base}/dashboard/lab", data={"policy": "name: x\n"}, verify=certificate,
                        headers={**admin, "Origin": base}, timeout=10)
    assert own.status_code == 422  # through the check (Host keeps its port), to the dry-run
    foreign = requests.post(f"{base}/dashboard/lab", data={"policy": "name: x\n"},
                            verify=certificate, timeout=10,
                            headers={**admin, "Origin": f"https://127.0.0.1:{free_port()}"})
    assert foreign.status_code == 403
    assert foreign.json()["error"]["code"] == "cross_site_request"

    plain = requests.get(f"http://127.0.0.1:{http_port}/dashboard?token={READER}",
                         allow_redirects=False, timeout=10)
    assert plain.status_code == 301
    assert plain.headers["Location"] == f"https://127.0.0.1/dashboard?token={READER}"
    assert "Set-Cookie" not in plain.headers

    # the proxy is trusted: its X-Forwarded-Proto counts on a direct request too
    r = requests.get(f"{server.base}/dashboard?token={READER}", timeout=10,
                     headers={"X-Forwarded-Proto": "https"})
    assert "; Secure" in r.headers["Set-Cookie"]


def test_no_forwarded_header_is_believed_by_default(start_server: Callable[..., Server]) -> None:
    server = start_server(workers=1)
    r = requests.get(f"{server.base}/dashboard?token={READER}", timeout=10,
                     headers={"X-Forwarded-Proto": "https"})
    assert r.status_code == 200 and "Secure" not in r.headers["Set-Cookie"]
