"""What a check run says (pure): conclusions, the telemetry summary, GitHub's limits."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bot.models import BuildStatus
from bot.reporters.check_run import (
    TEXT_LIMIT,
    BuildFacts,
    check_run_body,
    conclusion,
    log_text,
    summarize,
    summary_markdown,
)

P = ["linux/amd64", "linux/arm64"]
T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def event(name, platform=None, **data):
    return {"id": 1, "build_id": 1, "name": name, "platform": platform, "ts": "2026-11-24T10:00:00Z", "data": data}


def facts(status=BuildStatus.succeeded, **kw):
    values = dict(id=9, sha="a" * 40, status=status, platforms=P, started_at=T0, finished_at=T0, error_message=None)
    values.update(kw)
    return BuildFacts(**values)


@pytest.mark.parametrize(
    ("status", "partial", "expected"),
    [
        (BuildStatus.succeeded, False, "success"),
        (BuildStatus.succeeded, True, "neutral"),
        (BuildStatus.failed, False, "failure"),
        (BuildStatus.cancelled, False, "cancelled"),
        (BuildStatus.superseded, False, "cancelled"),
        (BuildStatus.skipped, False, "skipped"),
    ],
)
def test_conclusions(status, partial, expected):
    assert conclusion(status, partial) == expected


def test_the_body_follows_the_reported_state_not_the_build_now():
    queued = check_run_body(facts(BuildStatus.succeeded), "queued", "Queued", [], [], "https://ci/builds/9")
    assert queued["status"] == "queued" and "conclusion" not in queued
    running = check_run_body(facts(), "running", "Building", [], [], "https://ci/builds/9")
    assert (running["status"], running["started_at"]) == ("in_progress", "2026-11-24T10:00:00Z")
    progress = check_run_body(facts(), "progress", "Building", [], [], "https://ci/builds/9")
    assert progress["status"] == "in_progress" and progress["output"]["title"] == "Building"
    done = check_run_body(facts(), "succeeded", "Built", [], [], "https://ci/builds/9")
    assert (done["conclusion"], done["completed_at"]) == ("success", "2026-11-24T10:00:00Z")
    assert "actions" not in done
    failed = check_run_body(facts(BuildStatus.failed), "failed", "Failed", [], [], "https://ci/builds/9")
    assert failed["actions"] == [{"label": "Retry", "description": "Build this commit again", "identifier": "retry"}]


def test_a_partial_build_is_neutral():
    events = [event("build_succeeded", duration_s=1.0, platforms=["linux/amd64"], partial=True)]
    assert check_run_body(facts(), "succeeded", "Built", events, [], "u")["conclusion"] == "neutral"


def test_registry_text_cannot_break_the_table_or_the_fence():
    events = [
        event("push_failed", "linux/arm64", tag="r/a:t", kind="denied", attempts=1, retries=0,
              detail="denied: | nope\nsecond line"),
        event("build_failed", duration_s=2.0, error_kind="denied", error_message="```\nboom", step="push"),
    ]
    text = summary_markdown(summarize(events, P), "u", "head")
    assert "push denied\\: denied\\: \\| nope second line" in text
    assert "````\n```\nboom\n````" in text  # a longer fence: the message is shown as it is


def test_platforms_never_started_still_have_a_row():
    text = summary_markdown(summarize([], P), "u", "head")
    assert "| `linux/amd64` | ⏳ pending |" in text and "| `linux/arm64` | ⏳ pending |" in text


def test_the_summary_and_log_fit_githubs_limit():
    failed = [event("build_failed", duration_s=1.0, error_kind="build", error_message="x" * 70_000, step="build")]
    summary = summary_markdown(summarize(failed, P), "u", "head")
    assert len(summary) == TEXT_LIMIT and summary.endswith("(cut to GitHub's 65,535 characters)")
    lines = [{"platform": "linux/amd64", "line": f"line {i} " + "y" * 2000} for i in range(500)]
    text = log_text(lines)
    assert len(text) <= TEXT_LIMIT and text.rstrip("`\n").endswith("y") and "line 499 " in text
    assert "line 0 " not in text  # the newest lines are kept


def test_no_log_no_text():
    assert log_text([]) is None
    assert "text" not in check_run_body(facts(), "running", "Building", [], [], "u")["output"]


def test_only_the_last_attempt_counts():
    first = [event("build_started", attempt=1),
             event("push_retry", "linux/amd64", tag="t", attempt=1, delay_s=0.1, kind="network", refreshed=False,
                   detail="reset")]
    second = [event("build_started", attempt=2),
              event("push_succeeded", "linux/amd64", duration_s=1.0, tag="t", digest="sha256:" + "4" * 64,
                    size=10, attempts=1, retries=0)]
    amd = summarize(first + second, P).platforms[0]
    assert (amd["platform"], amd["retry_kinds"], amd["push_attempts"], amd["status"]) == ("linux/amd64", [], 1, "pushed")


def test_build_retries_are_named_apart_from_push_retries():
    seen = [event("build_started", attempt=1),
            event("build_platform_retry", "linux/amd64", attempt=1, delay_s=0.0, kind="auth", refreshed=True,
                  detail="unauthorized"),
            event("push_retry", "linux/amd64", tag="t", attempt=1, delay_s=0.1, kind="network", refreshed=False,
                  detail="reset"),
            event("build_platform_retry", "linux/arm64", attempt=1, delay_s=0.5, kind="network", refreshed=False,
                  detail="reset")]
    rows = [line for line in summary_markdown(summarize(seen, P), "u", "head").splitlines() if line.startswith("| `linux")]
    assert "| build 1 (auth); push 1 (network) |" in rows[0] and "| build 1 (network) |" in rows[1]


# -- untrusted text is shown as text -------------------------------------------------------------

#: An error message as a hostile Dockerfile, registry or git could print it.
HOSTILE = ("[log in again](https://evil.example/login) ![pixel](https://evil.example/p.png) "
           "<img src=https://evil.example/i.png> <a href=https://evil.example>x</a> https://evil.example/auto "
           "www.evil.example **bold** `code` &amp; | pipe\n# heading\n```\n````")


def _rendered(markdown: str) -> str:
    """The Markdown as GitHub renders it (cmark-gfm, GitHub's own parser, with its extensions)."""
    import cmarkgfm

    return cmarkgfm.github_flavored_markdown_to_html(markdown)


def _links_and_images(html: str) -> list[str]:
    import re

    return re.findall(r"<(?:a|img)\b[^>]*>", html)


def test_markdown_in_an_error_is_escaped_in_the_check_run():
    events = [
        event("push_failed", "linux/arm64", tag="r/a:t", kind="denied", attempts=1, retries=0, detail=HOSTILE),
        event("build_failed", duration_s=2.0, error_kind="build", error_message=HOSTILE, step="build"),
    ]
    body = check_run_body(facts(BuildStatus.failed), "failed", f"Failed (build): {HOSTILE}", events,
                          [{"platform": "linux/arm64", "line": HOSTILE}], "https://ci.example/builds/9")
    summary = _rendered(body["output"]["summary"])
    assert _links_and_images(summary) == ['<a href="https://ci.example/builds/9">']  # the build page only
    assert "<strong>bold</strong>" not in summary and "<h1>" not in summary
    assert "&lt;img src=https://evil.example/i.png&gt;" in summary  # shown, not made an image
    assert summary.count("<table>") == 1 and "<td>" in summary  # the pipe did not break the table
    text = _rendered(body["output"]["text"])
    assert _links_and_images(text) == [] and text.count("</pre>") == 1  # one block: no line closed it


@pytest.mark.parametrize("message", [HOSTILE, "plain words", "a ``` b", "`", "|", ""])
def test_escaped_text_reads_back_as_written(message):
    """Escaping changes how text is written, never what a reader sees."""
    import html
    import re

    from bot.reporters.check_run import _code, _text

    shown = " ".join(message.split())
    for markdown in (_text(message), _code(message)):
        rendered = _rendered(f"| x |\n| --- |\n| {markdown} |") if markdown else ""
        cell = re.search(r"<td>(.*)</td>", rendered, re.S)
        assert html.unescape(re.sub(r"</?code>", "", cell.group(1) if cell else "")) == shown
