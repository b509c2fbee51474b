"""Config errors for the filter keys (filters:, default_filters:, consumers:, redis:) as
`sluice -t -c FILE` reports them: exit 1 and `FILE:LINE:COL: key.path: message`, and a valid
filter config passes."""

import hashlib
import re

import pytest

from filter_peers import HMAC_SECRET, write_public_pem
from helpers import run_cli
from peers import free_port

BASE = """\
workers: 1
log_level: info
{top}listeners:
  - name: public
    address: 127.0.0.1:{port}
upstreams:
  - name: app
    endpoints:
      - {{address: 127.0.0.1:9}}
routes:
  - name: all
    match: {{path_prefix: /}}
    upstream: app
    filters:
{filters}"""

CONSUMERS = """\
consumers:
  - {name: mobile-app, api_key: "mobile-key-0123456789"}
"""


def config(filters, top=""):
    return BASE.format(top=top, port=free_port(),
                       filters="".join("      - %s\n" % f for f in filters))


def check(tmp_path, text, name="sluice.yaml"):
    p = tmp_path / name
    p.write_text(text)
    r = run_cli(["-t", "-c", str(p)])
    return str(p), r


def position(text, needle, after=None):
    start = text.index(after) if after else 0
    i = text.index(needle, start)
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


def lines(r):
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def expect_error(r, path, key_path, needle=None, at=None, text=None):
    """Exit 1 and a line `path:L:C: key_path: ...` (L:C from `at` in `text` when given)
    whose message contains `needle` (case-insensitive)."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    if at is not None:
        line, col = position(text, at)
        prefix = "%s:%d:%d: %s: " % (path, line, col, key_path)
        hits = [ln for ln in lines(r) if ln.startswith(prefix)]
    else:
        pat = re.compile(r"^%s:\d+:\d+: %s: " % (re.escape(path), re.escape(key_path)))
        hits = [ln for ln in lines(r) if pat.match(ln)]
        prefix = pat.pattern
    assert hits, "expected a line starting %r in stderr:\n%s" % (prefix, r.stderr)
    if needle:
        assert any(needle.lower() in h.lower() for h in hits), (needle, hits)
    return hits


def test_valid_filter_config_passes(tmp_path):
    pem = write_public_pem(tmp_path, "rsa")
    text = config(["api_key: {consumers: [mobile-app]}",
                   "jwt: {public_key_file: %s, leeway: 30s, issuers: [https://idp], "
                   "claims_to_headers: {sub: X-User-Id}}" % pem,
                   "rate_limit: {rate: 10/s, burst: 5, key: [ip, consumer]}"],
                  top=CONSUMERS + "default_filters:\n  - rate_limit: {rate: 1000/s}\n")
    path, r = check(tmp_path, text)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_unknown_filter_name(tmp_path):
    text = config(["jwtt: {secret: %s}" % HMAC_SECRET])
    path, r = check(tmp_path, text)
    assert r.returncode == 1, (r.stdout, r.stderr)
    line, col = position(text, "jwtt")
    pat = re.compile(r"^%s:%d:%d: routes\[0\]\.filters\[0\](\.jwtt)?: unknown filter"
                     % (re.escape(path), line, col))
    hits = [ln for ln in lines(r) if pat.match(ln)]
    assert hits, r.stderr
    assert '"jwtt"' in hits[0] and "api_key" in hits[0], hits  # names the known ones


def test_unknown_key_inside_jwt(tmp_path):
    text = config(["jwt: {secret: %s, leway: 30s}" % HMAC_SECRET])
    path, r = check(tmp_path, text)
    hits = expect_error(r, path, "routes[0].filters[0].jwt.leway", "unknown key", at="leway",
                        text=text)
    assert "leeway" in hits[0], hits  # the did-you-mean hint


def test_unknown_key_in_default_filters(tmp_path):
    text = config(["api_key: {}"],
                  top=CONSUMERS + "default_filters:\n  - rate_limit: {rate: 5/s, brust: 3}\n")
    path, r = check(tmp_path, text)
    expect_error(r, path, "default_filters[0].rate_limit.brust", "unknown key", at="brust",
                 text=text)


def test_jwt_with_two_key_sources(tmp_path):
    pem = write_public_pem(tmp_path, "ec256")
    text = config(["jwt: {secret: %s, public_key_file: %s}" % (HMAC_SECRET, pem)])
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].jwt", "exactly one")


def test_jwt_with_no_key_source(tmp_path):
    text = config(["jwt: {leeway: 5s}"])
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].jwt", "exactly one")


def test_jwt_secret_too_short(tmp_path):
    text = config(["jwt: {secret: short-secret-0123456789}"])  # 23 bytes
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].jwt", "32")


def test_jwt_unknown_algorithm(tmp_path):
    text = config(["jwt: {secret: %s, algorithms: [HS256, none]}" % HMAC_SECRET])
    path, r = check(tmp_path, text)
    assert r.returncode == 1, r.stderr
    assert re.search(r"routes\[0\]\.filters\[0\]\.jwt\.algorithms(\[1\])?: .*none", r.stderr), \
        r.stderr


def test_jwt_missing_public_key_file(tmp_path):
    text = config(["jwt: {public_key_file: %s}" % (tmp_path / "nope.pem")])
    path, r = check(tmp_path, text)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "nope.pem" in r.stderr and "routes[0].filters[0]" in r.stderr, r.stderr


def test_jwt_bad_jwks_url(tmp_path):
    text = config(["jwt: {jwks_url: ftp://idp.example/jwks}"])
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].jwt.jwks_url", "http", at="ftp://", text=text)


def test_jwt_refetch_interval_zero_rejected(tmp_path):
    """0s would have to mean "no minimum"; sluice does not offer that (a floor of 1s keeps a
    forged-kid flood from becoming an IdP flood) and must say so rather than use another
    value silently."""
    text = config(["jwt: {jwks_url: https://idp.test/jwks, jwks_refetch_interval: 0s}"])
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].jwt.jwks_refetch_interval", "range",
                 at="0s", text=text)


def test_rate_limit_bad_rate(tmp_path):
    text = config(["rate_limit: {rate: 10/x, burst: 5}"])
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].rate_limit.rate", at="10/x", text=text)


@pytest.mark.parametrize("rate", ["0/s", "ten/s", "10", "-1/s"])
def test_rate_limit_other_bad_rates(tmp_path, rate):
    text = config(["rate_limit: {rate: %s}" % rate])
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].rate_limit.rate")


def test_rate_limit_requires_rate(tmp_path):
    text = config(["rate_limit: {burst: 5}"])
    path, r = check(tmp_path, text)
    assert r.returncode == 1, r.stderr
    assert re.search(r"routes\[0\]\.filters\[0\]\.rate_limit(\.rate)?: .*rate", r.stderr), \
        r.stderr


def test_rate_limit_bad_key(tmp_path):
    text = config(["rate_limit: {rate: 10/s, key: cookie:sid}"])
    path, r = check(tmp_path, text)
    assert r.returncode == 1, r.stderr
    assert "routes[0].filters[0].rate_limit.key" in r.stderr, r.stderr


def test_global_scope_without_redis(tmp_path):
    text = config(["rate_limit: {rate: 10/s, scope: global}"])
    path, r = check(tmp_path, text)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "redis" in r.stderr.lower(), r.stderr
    assert "routes[0].filters[0]" in r.stderr, r.stderr


def test_global_scope_with_redis_passes(tmp_path):
    text = config(["rate_limit: {rate: 10/s, scope: global, on_redis_error: deny}"],
                  top="redis: {address: 127.0.0.1:%d, timeout: 50ms}\n" % free_port())
    path, r = check(tmp_path, text)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_bad_on_redis_error(tmp_path):
    text = config(["rate_limit: {rate: 10/s, scope: global, on_redis_error: maybe}"],
                  top="redis: {address: 127.0.0.1:6379}\n")
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0].rate_limit.on_redis_error", at="maybe",
                 text=text)


def test_redis_without_address(tmp_path):
    text = config(["api_key: {}"], top=CONSUMERS + "redis: {timeout: 50ms}\n")
    path, r = check(tmp_path, text)
    assert r.returncode == 1, r.stderr
    assert re.search(r"^%s:\d+:\d+: redis(\.address)?: .*address" % re.escape(path),
                     r.stderr, re.M), r.stderr


def test_api_key_without_consumers(tmp_path):
    text = config(["api_key: {}"])
    path, r = check(tmp_path, text)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "consumers" in r.stderr and "routes[0].filters[0]" in r.stderr, r.stderr


def test_api_key_unknown_consumer_in_list(tmp_path):
    text = config(["api_key: {consumers: [mobile-app, ghost]}"], top=CONSUMERS)
    path, r = check(tmp_path, text)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert '"ghost"' in r.stderr, r.stderr


def test_consumer_with_both_key_forms(tmp_path):
    sha = hashlib.sha256(b"x").hexdigest()
    top = ("consumers:\n  - {name: both, api_key: \"both-key-0123456789\", api_key_sha256: \"%s\"}\n"
           % sha)
    text = config(["api_key: {}"], top=top)
    path, r = check(tmp_path, text)
    # Reported at the second key's value (a quoted scalar starts at its quote).
    expect_error(r, path, "consumers[0].api_key_sha256", "api_key", at='"' + sha, text=text)


@pytest.mark.parametrize("bad", ["%s" % ("g" * 64), "abcd", "%sff" % ("0" * 64)])
def test_consumer_bad_sha256_hex(tmp_path, bad):
    text = config(["api_key: {}"],
                  top="consumers:\n  - {name: c1, api_key_sha256: \"%s\"}\n" % bad)
    path, r = check(tmp_path, text)
    expect_error(r, path, "consumers[0].api_key_sha256", "64 hex", at='"' + bad, text=text)


def test_consumer_key_too_short(tmp_path):
    text = config(["api_key: {}"], top="consumers:\n  - {name: c1, api_key: \"short\"}\n")
    path, r = check(tmp_path, text)
    expect_error(r, path, "consumers[0].api_key", "8", at="\"short\"", text=text)


def test_filter_entry_not_one_key_mapping(tmp_path):
    text = config(["{api_key: {}, jwt: {secret: %s}}" % HMAC_SECRET], top=CONSUMERS)
    path, r = check(tmp_path, text)
    expect_error(r, path, "routes[0].filters[0]", "one-key")


def test_every_filter_error_is_reported(tmp_path):
    text = config(["jwt: {secret: %s, leway: 1s}" % HMAC_SECRET,
                   "rate_limit: {rate: 10/x}"],
                  top="consumers:\n  - {name: c1, api_key_sha256: \"xyz\"}\n")
    path, r = check(tmp_path, text)
    assert r.returncode == 1
    for key in ("routes[0].filters[0].jwt.leway", "routes[0].filters[1].rate_limit.rate",
                "consumers[0].api_key_sha256"):
        assert re.search(r"^%s:\d+:\d+: %s: " % (re.escape(path), re.escape(key)), r.stderr,
                         re.M), (key, r.stderr)
