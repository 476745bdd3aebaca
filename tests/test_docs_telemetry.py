"""docs/telemetry.md is the contract: it must list every event, every field and where the
platform goes, exactly as the schemas in bot/telemetry.py say."""

from __future__ import annotations

import re

from bot import telemetry
from tests.support import ROOT

DOC = (ROOT / "docs" / "telemetry.md").read_text()


def sections() -> dict[str, str]:
    parts = re.split(r"^### `([a-z_]+)`$", DOC, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_event_is_documented_and_nothing_else():
    assert list(sections()) == list(telemetry.SCHEMAS)


def test_fields_and_platform_rule_match_the_schemas():
    for name, text in sections().items():
        documented = re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.M)
        assert documented == list(telemetry.SCHEMAS[name].model_fields), name
        rule = re.search(r"^platform: (.+)$", text, flags=re.M).group(1)
        expected = ("required" if name in telemetry.PLATFORM_EVENTS
                    else "never" if name in telemetry.BUILD_WIDE_EVENTS else "where it has one")
        assert rule == expected, name
