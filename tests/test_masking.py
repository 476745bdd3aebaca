"""The one masker (pure): every form a secret may take in text is masked."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

import pytest

from bot.masking import MASK, Masker, mask
from bot.pipeline.push import sanitize

SECRET = "p@ss/w0rd+ä\"é-secret"


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode], ids=["standard", "urlsafe"])
@pytest.mark.parametrize("before", [b"", b"a", b"ab", b"user:", b"x-access-token:"])
@pytest.mark.parametrize("after", [b"", b"z", b"zy", b" and more bytes"])
@pytest.mark.parametrize("padded", [True, False])
def test_base64_at_every_alignment_with_and_without_padding(encode, before, after, padded):
    blob = encode(before + SECRET.encode() + after).decode()
    blob = blob if padded else blob.rstrip("=")
    masked = Masker({"TOKEN": SECRET}).mask(f"Authorization: Basic {blob}.")
    assert masked.count(MASK) == 1
    # all that is left of the blob is what encodes the bytes around the secret (and the
    # two or three characters mixing their bits with the secret's)
    left = len(masked) - len("Authorization: Basic .") - len(MASK)
    assert left <= -(-len(before) * 4 // 3) + -(-len(after) * 4 // 3) + 4


def test_the_raw_value_and_a_basic_pair_are_masked_whole():
    masker = Masker()
    masker.add_basic("oauth2", "s3cr3t-token")
    encoded = base64.b64encode(b"oauth2:s3cr3t-token").decode()
    assert masker.mask(f"token s3cr3t-token and {encoded}!") == "token *** and ***!"


@pytest.mark.parametrize("form", [
    quote(SECRET, safe=""), quote(SECRET), quote_plus(SECRET),
    json.dumps(SECRET)[1:-1], json.dumps(SECRET, ensure_ascii=False)[1:-1],
    json.dumps(SECRET)[1:-1].replace("/", "\\/"),
], ids=["percent", "percent-keep-slash", "form", "json-ascii", "json", "json-slash"])
def test_percent_encoding_and_json_escaping(form):
    assert form != SECRET
    assert Masker([SECRET]).mask(f"https://x/?q={form}&b=1") == "https://x/?q=***&b=1"


def test_the_lower_case_hex_form():
    lower = "".join(c.lower() if c in "ABCDEF" else c for c in quote(SECRET, safe=""))
    assert Masker([SECRET]).mask(lower) == MASK


def test_found_names_the_secrets_never_their_values():
    masker = Masker({"NPM_TOKEN": "npm-secret-1234", "OTHER": "other-secret-5678"})
    history = json.dumps([{"CreatedBy": "|1 NPM_TOKEN=npm-secret-1234 /bin/sh -c make"},
                          {"Env": [base64.b64encode(b"key=other-secret-5678").decode()]}])
    assert masker.found(history) == ["NPM_TOKEN", "OTHER"]
    assert masker.found("nothing here") == []


def test_nested_data_is_masked_and_other_values_kept():
    data = {"message": "bad s3cr3t-token", "tags": ["a", "s3cr3t-token"], "attempts": 2, "ok": True}
    assert Masker(["s3cr3t-token"]).mask_data(data) == {"message": "bad ***", "tags": ["a", "***"],
                                                         "attempts": 2, "ok": True}


def test_short_secrets_mask_only_as_themselves_and_empty_ones_nothing():
    assert Masker(["ab"]).mask("xab YWI=") == "x*** YWI="
    assert Masker(["", None]).mask("text") == "text"
    assert "s3cr3t" not in repr(Masker(["s3cr3t"]))


def test_registry_details_use_the_same_masker():
    encoded = base64.b64encode(b"bot:hunter2-pass").decode()
    assert sanitize(f"denied for {encoded} (hunter2-pass)", ("hunter2-pass",)).count(MASK) == 2
    assert mask(quote("a b/c+d!"), ["a b/c+d!"]) == MASK
