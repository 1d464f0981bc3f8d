"""Behind an HTTPS proxy (TRAFFICWATCH_TLS_PROXY=1) Superset's session cookie is Secure and HSTS is sent;
without it (plain http://127.0.0.1, the local default) the cookie is not, or no login would ever work. A request
the login page sends as it unloads cannot undo the login.

Superset's real application (superset_config.py through create_app) answers the login page in its own
environment, on the test session's bootstrapped metadata, as a proxy would forward it. The same answer's content
security policy names OpenStreetMap's tile host only when the maps have a base map (TRAFFICWATCH_BASE_MAP).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from .conftest import REPO, SUPERSET_PYTHON, SupersetInstance

pytestmark = [pytest.mark.dashboards, pytest.mark.timeout(600)]

CONFIG = REPO / "superset" / "superset_config.py"

LOGIN_PAGE = """
import json, logging
logging.disable(logging.CRITICAL)
from superset.app import create_app
with create_app().test_client() as client:
    response = client.get("/login/", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "traffic.example"})
    print(json.dumps({"status": response.status_code, "cookies": response.headers.getlist("Set-Cookie"),
                      "hsts": response.headers.get("Strict-Transport-Security"),
                      "csp": response.headers.get("Content-Security-Policy")}))
"""


def login_page(superset: SupersetInstance, tls_proxy: str, base_map: str = "none") -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SUPERSET_PYTHON), "-c", LOGIN_PAGE],
        env={
            **superset.env,
            "SUPERSET_CONFIG_PATH": str(CONFIG),
            "TRAFFICWATCH_TLS_PROXY": tls_proxy,
            "TRAFFICWATCH_BASE_MAP": base_map,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def session_cookie(answer: dict) -> list[str]:
    (cookie,) = [c for c in answer["cookies"] if c.startswith("session=")]
    return [part.strip() for part in cookie.split(";")]


def test_behind_a_tls_proxy_the_session_cookie_is_secure(superset: SupersetInstance) -> None:
    done = login_page(superset, "1")
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["status"] == 200
    assert {"Secure", "HttpOnly", "SameSite=Lax"} <= set(session_cookie(answer))
    assert answer["hsts"] and answer["hsts"].startswith("max-age=")


def test_without_a_proxy_the_cookie_works_on_plain_http(superset: SupersetInstance) -> None:
    done = login_page(superset, "0")
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["status"] == 200
    parts = session_cookie(answer)
    assert "Secure" not in parts and "HttpOnly" in parts
    assert answer["hsts"] is None


def test_a_misspelt_setting_is_refused(superset: SupersetInstance) -> None:
    done = login_page(superset, "yes")
    assert done.returncode != 0
    assert "TRAFFICWATCH_TLS_PROXY must be 0 or 1" in done.stderr


def test_the_event_log_the_login_page_sends_as_it_unloads_cannot_undo_the_login(superset: SupersetInstance) -> None:
    """Submitting the login form unloads the login page, which then posts its event log with the anonymous
    session cookie: that request is in flight beside the login's. Superset answered it with a redirect to the
    login page and a session cookie (the anonymous session and a flash message); when that answer came last, it
    replaced the new login's cookie and the user was on the login page again (seen in the dashboards' tests,
    viewer logins sent back to /login/?next=...). The answer to an anonymous event log sets no cookie."""
    anonymous = requests.Session()
    anonymous.get(f"{superset.url}/login/", timeout=60).raise_for_status()
    assert "session" in anonymous.cookies  # the login page's anonymous session, the one the unload request carries
    answer = anonymous.post(
        f"{superset.url}/superset/log/?explode=events", data={"events": "[]"}, allow_redirects=False, timeout=60
    )
    assert answer.status_code < 500
    assert "session" not in answer.cookies, answer.headers.get("Set-Cookie")


@pytest.mark.parametrize(("base_map", "allowed"), [("none", False), ("osm", True)])
def test_the_content_security_policy_allows_the_tile_host_only_with_a_base_map(
    superset: SupersetInstance, base_map: str, allowed: bool
) -> None:
    """TRAFFICWATCH_BASE_MAP=none (offline) leaves OpenStreetMap's tile host out of what pages may load."""
    done = login_page(superset, "0", base_map)
    assert done.returncode == 0, done.stderr[-2000:]
    csp = json.loads(done.stdout.splitlines()[-1])["csp"]
    assert "img-src 'self'" in csp
    assert ("https://tile.openstreetmap.org" in csp) is allowed, csp


def test_an_unknown_base_map_is_refused(superset: SupersetInstance) -> None:
    done = login_page(superset, "0", "mapbox")
    assert done.returncode != 0
    assert "TRAFFICWATCH_BASE_MAP must be osm or none, not 'mapbox'" in done.stderr
