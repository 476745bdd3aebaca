"""The status page as HTML: the list works without JavaScript (links, a GET form, paging),
a build's page has its results, digests, timeline lanes and log tail, fragments for the
script, and errors as pages. (The live behaviour in a browser: tests/e2e/test_dashboard_browser.py.)
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from bot import telemetry
from bot.models import utcnow
from tests.test_api_rest import record_all
from tests.test_summary import DIGEST, whole_build
from tests.test_queue import enqueue, request


class Elements(HTMLParser):
    """Start tags with their attributes, in document order (parsing also proves well-formedness
    enough for a browser to agree on the structure)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


@pytest.fixture
def built(db):
    """Eight builds of two repos; the newest of acme/app went through the whole pipeline."""
    ids = enqueue(db, *[request(ref=f"refs/heads/b{i}", sha=f"{i:040x}") for i in range(7)])
    record_all(db, ids[-1], whole_build())
    db.write_sync(lambda c: telemetry._store_log_lines(c, [
        (ids[-1], "linux/arm64", utcnow(), ["Step 1/2 : FROM base", "<script>alert(1)</script>"]),
    ]))
    return ids


def test_the_list_without_javascript(client, built):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = Elements(response.text)
    rows = page.find("tr")[1:]  # after the header row
    assert [int(r["data-id"]) for r in rows] == list(reversed(built))
    assert {a["href"] for a in page.find("a")} >= {f"/builds/{i}" for i in built}
    (form,) = page.find("form")
    assert form["method"] == "get" and form["action"] == "/"
    assert {i["name"] for i in page.find("input")} == {"repo", "ref"}
    assert page.find("select", name="status")


def test_filters_and_paging_are_links(client, built):
    page = Elements(client.get("/?repo=acme/app&limit=3").text)
    assert [int(r["data-id"]) for r in page.find("tr")[1:]] == list(reversed(built))[:3]
    (older,) = page.find("a", rel="next")
    assert older["href"].startswith("/?repo=acme%2Fapp&limit=3&cursor=")
    second = Elements(client.get(older["href"]).text)
    assert [int(r["data-id"]) for r in second.find("tr")[1:]] == list(reversed(built))[3:6]
    assert any(a["href"] == "/?repo=acme%2Fapp&limit=3" for a in second.find("a"))
    assert Elements(client.get("/?status=succeeded").text).find("tr")[1:] == []
    assert "No builds match" in client.get("/?status=succeeded").text


def test_a_bad_filter_is_an_html_page(client):
    response = client.get("/?status=done")
    assert response.status_code == 400 and response.headers["content-type"].startswith("text/html")
    assert "status must be one of" in response.text


def test_a_builds_page(client, built):
    build_id = built[-1]
    response = client.get(f"/builds/{build_id}")
    assert response.status_code == 200
    html = response.text
    page = Elements(html)
    (root,) = page.find("div", data_build=str(build_id))
    event_ids = [e["id"] for e in client.get(f"/api/builds/{build_id}/events").json()["events"]]
    assert re.fullmatch(rf"{max(event_ids)}-\d+", root["data-position"])
    # one lane for the build's own steps, one per platform, each with its steps
    assert [lane["data-lane"] for lane in page.find("div", **{"class": "lane"})] == ["build", "linux/amd64", "linux/arm64"]
    kinds = [a["data-kind"] for _, a in page.tags if "data-kind" in a]
    assert kinds.count("push") == 2 and {"fetch", "build", "tag", "retry", "auth", "manifest"} <= set(kinds)
    assert all(re.search(r"left: [\d.]+%; width: [\d.]+%", a["style"]) for a in page.find("div") if "data-kind" in a)
    assert [r["data-platform"] for r in page.find("tr", **{"class": "platform"})] == ["linux/amd64", "linux/arm64"]
    digests = [c["title"] for c in page.find("code", **{"class": "digest"})]
    assert digests == [DIGEST, DIGEST, "sha256:" + "d" * 64]  # both images, then the manifest list
    assert "Step 1/2 : FROM base" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_builds_page_shows_what_the_forge_was_told(client, db, built):
    from bot.reporters import outbox
    from tests.test_queue import LEASE

    build_id = built[-1]
    owed = db.write_sync(lambda c: outbox.claim(c, "s1", 10, LEASE, utcnow()))
    mine = next(r for r in owed if r.build_id == build_id)
    db.write_sync(lambda c: outbox.retry_at(c, mine.id, "s1", [], utcnow(), "rate_limited: <b>slow down</b>"))
    page = Elements(client.get(f"/builds/{build_id}").text)
    assert [r["data-state"] for r in page.find("tr", **{"class": "report"})] == ["pending"]
    html = client.get(f"/builds/{build_id}/live").text
    assert "rate_limited: &lt;b&gt;slow down&lt;/b&gt;" in html and "Reported to GitHub" in html


def test_fragments_for_the_script(client, built):
    row = client.get(f"/builds/{built[0]}/row")
    assert row.status_code == 200 and row.text.lstrip().startswith(f'<tr id="build-{built[0]}"')
    live = client.get(f"/builds/{built[-1]}/live")
    assert live.status_code == 200 and 'data-lane="linux/arm64"' in live.text and "<html" not in live.text


@pytest.mark.parametrize("path", ["/builds/999", "/builds/abc", "/builds/999/live", "/builds/999/row"])
def test_an_unknown_build_is_an_html_404(client, path):
    response = client.get(path)
    assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    assert "no build" in response.text


def test_static_files_are_served(client):
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "EventSource" in script.text
    assert client.get("/static/dashboard.css").status_code == 200
    assert client.get("/static/nothing.js").status_code == 404


def test_a_build_whose_log_was_deleted_says_so(client, db):
    from datetime import timedelta

    from sqlalchemy import update

    from bot.models import builds

    (build_id,) = enqueue(db, request(), at=utcnow())
    db.write_sync(lambda c: c.execute(update(builds).where(builds.c.id == build_id).values(
        status="succeeded", finished_at=utcnow() - timedelta(days=91))))
    assert "The log was deleted 90 days after the build ended" in client.get(f"/builds/{build_id}").text
    db.write_sync(lambda c: c.execute(update(builds).where(builds.c.id == build_id).values(
        finished_at=utcnow() - timedelta(days=1))))
    assert "The log was deleted" not in client.get(f"/builds/{build_id}").text
