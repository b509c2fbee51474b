"""jwt filter against the real binary: every algorithm with PEM keys and a JWK Set file, the
401/403 answers for each way a token can be bad, claims to upstream headers, token sources,
the verified-token cache, and JWKS over HTTP(S) from a local IdP (rotation, forged kids,
stale keys while the IdP is down, TLS with a private CA).

Tokens come from PyJWT (python3-jwt) and keys from python3-cryptography; the tokens PyJWT
refuses to make (alg none, HMAC keyed with a public key) are made by hand."""

import json
import os
import random
import string
import time

import pytest

from client import assert_gateway_error
from filter_peers import (ASYMMETRIC_ALGS, HMAC_ALGS, HMAC_SECRET, KeepAliveClient,
                          backend_headers, b64u, bearer, claims, compact, direct_route,
                          error_of, filter_config, flip_signature, hs_token_with_key, hvalues,
                          jwk, jwks, jwks_server, make_token, public_pem, q, route, tls_files,
                          write_json, write_public_pem)
from helpers import poll

assert jwks_server  # a fixture used by the JWKS-over-HTTP tests below

ISS = "https://idp.test/"
AUD = "orders-api"
KIDS = {"rsa": "rsa-1", "ec256": "ec-256", "ec384": "ec-384", "ed25519": "ed-1"}
KIND = {"RS": "rsa", "PS": "rsa", "ES256": "ec256", "ES384": "ec384", "EdDSA": "ed25519"}


def kind_of(alg):
    return KIND.get(alg) or KIND[alg[:2]]


def hs(**kw):
    return "jwt: {secret: %s%s}" % (q(HMAC_SECRET), "".join(", %s: %s" % i for i in kw.items()))


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for kind in KIDS:
        write_public_pem(d, kind)
    write_json(d, "jwks.json", jwks(*[jwk(kind, kid) for kind, kid in KIDS.items()]))
    return d


def pem(keydir, kind):
    return os.path.join(str(keydir), "%s-0.pub.pem" % kind)


@pytest.fixture(scope="module")
def gw(module_gateway_factory, module_backend, keydir):
    b = module_backend()
    rsa_pem = pem(keydir, "rsa")
    routes = route("hs", "/hs", [hs()])
    for kind in KIDS:
        routes += route("pem-" + kind, "/pem/" + kind,
                        ["jwt: {public_key_file: %s}" % pem(keydir, kind)])
    routes += route("jwks", "/jwks", ["jwt: {jwks_file: %s}" % os.path.join(str(keydir),
                                                                             "jwks.json")])
    routes += route("strict", "/strict",
                    ["jwt: {public_key_file: %s, issuers: [%s], audiences: [%s]}"
                     % (rsa_pem, q(ISS), AUD)])
    routes += route("leeway", "/leeway",
                    ["jwt: {public_key_file: %s, leeway: 30s}" % rsa_pem])
    routes += route("claims", "/claims",
                    ["jwt: {secret: %s, required_claims: [scope], claims: {role: admin}, "
                     "claims_to_headers: {sub: X-User-Id, tenant: X-Tenant}, "
                     "strip_authorization: true}" % q(HMAC_SECRET)])
    routes += route("keepauth", "/keepauth",
                    ["jwt: {secret: %s, claims_to_headers: {sub: X-User-Id}}" % q(HMAC_SECRET)])
    routes += route("from", "/from",
                    ["jwt: {secret: %s, from: [cookie:session, query:access_token, "
                     "header:X-Token]}" % q(HMAC_SECRET)])
    routes += route("only-rs256", "/only-rs256",
                    ["jwt: {public_key_file: %s, algorithms: [RS256]}" % rsa_pem])
    routes += route("nocache", "/nocache",
                    ["jwt: {public_key_file: %s, cache_size: 0, negative_cache_size: 0}"
                     % pem(keydir, "ec256")])
    routes += direct_route("open", "/open")
    text = filter_config(routes=routes, limits="{max_header_bytes: 64KiB}", workers=2)
    return module_gateway_factory.start(text, B1=b.addr)


def get(gw, path, token=None, headers=()):
    hs_ = list(headers)
    if token is not None:
        hs_ += bearer(token)
    return gw.request("GET", path, hs_)


def assert_invalid(resp, token=None, reason=None):
    """401 with WWW-Authenticate: Bearer error="invalid_token", a JSON error body with a
    request id, the token not echoed."""
    doc = assert_gateway_error(resp, 401)
    assert resp.header("www-authenticate") == 'Bearer error="invalid_token"', resp
    if reason:
        assert doc["error"] == reason, doc
    if token:
        assert token.encode() not in resp.raw_head + resp.body, resp
        # Not even its signature or its payload part.
        for part in token.split("."):
            if len(part) >= 16:
                assert part.encode() not in resp.body, resp
    return doc


# ---- every algorithm ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", HMAC_ALGS)
def test_hmac_algorithm_accepted(gw, alg):
    r = get(gw, "/hs/x", make_token(alg))
    assert r.status == 200, r


@pytest.mark.parametrize("alg", ASYMMETRIC_ALGS)
def test_algorithm_accepted_with_pem(gw, alg):
    r = get(gw, "/pem/%s/x" % kind_of(alg), make_token(alg))
    assert r.status == 200, r


@pytest.mark.parametrize("alg", ASYMMETRIC_ALGS)
def test_algorithm_accepted_with_jwks_file(gw, alg):
    kind = kind_of(alg)
    r = get(gw, "/jwks/x", make_token(alg, kid=KIDS[kind]))
    assert r.status == 200, r


def test_algorithms_list_restricts(gw):
    assert get(gw, "/only-rs256/x", make_token("RS256")).status == 200
    r = get(gw, "/only-rs256/x", make_token("PS256"))
    assert_invalid(r, reason="bad_algorithm")


# ---- rejections --------------------------------------------------------------------------------


def test_alg_none_rejected(gw):
    tok = compact({"alg": "none", "typ": "JWT"}, claims())
    for path in ("/pem/rsa/x", "/hs/x", "/jwks/x"):
        assert_invalid(get(gw, path, tok), tok)
    # Also with "None"/"NONE" spellings and with a junk signature attached.
    for alg in ("None", "NONE"):
        t = compact({"alg": alg}, claims(), b"sig")
        assert_invalid(get(gw, "/pem/rsa/x", t), t)


def test_hmac_keyed_with_rsa_public_key_rejected(gw, keydir):
    """Algorithm confusion: HS256 signed with the route's RSA public key PEM as the secret."""
    with open(pem(keydir, "rsa"), "rb") as f:
        pem_bytes = f.read()
    for key in (pem_bytes, pem_bytes.strip(), public_pem("rsa")):
        tok = hs_token_with_key(key)
        assert_invalid(get(gw, "/pem/rsa/x", tok), tok)
    tok = hs_token_with_key(pem_bytes, kid=KIDS["rsa"])
    assert_invalid(get(gw, "/jwks/x", tok), tok)


def test_expired_rejected(gw):
    now = int(time.time())
    tok = make_token("RS256", claims(exp=now - 60, iat=now - 120))
    assert_invalid(get(gw, "/pem/rsa/x", tok), tok, "token_expired")


def test_not_yet_valid_rejected(gw):
    tok = make_token("RS256", claims(nbf=int(time.time()) + 120))
    assert_invalid(get(gw, "/pem/rsa/x", tok), tok, "token_not_yet_valid")


def test_issued_in_future_rejected(gw):
    tok = make_token("RS256", claims(iat=int(time.time()) + 600, ttl=1200))
    assert_invalid(get(gw, "/pem/rsa/x", tok), tok, "token_issued_in_future")


def test_wrong_issuer_rejected(gw):
    good = make_token("RS256", claims(iss=ISS, aud=AUD))
    assert get(gw, "/strict/x", good).status == 200
    for iss in ("https://evil.test/", "https://idp.test", None):
        tok = make_token("RS256", claims(iss=iss, aud=AUD))
        assert_invalid(get(gw, "/strict/x", tok), tok, "bad_issuer")


def test_wrong_audience_rejected(gw):
    assert get(gw, "/strict/x", make_token("RS256", claims(iss=ISS, aud=[AUD, "other"]))) \
        .status == 200
    for aud in ("billing-api", ["a", "b"], None):
        tok = make_token("RS256", claims(iss=ISS, aud=aud))
        assert_invalid(get(gw, "/strict/x", tok), tok, "bad_audience")


def test_bad_signature_rejected(gw):
    for alg in ("HS256", "RS256", "ES256", "EdDSA"):
        path = "/hs/x" if alg == "HS256" else "/pem/%s/x" % kind_of(alg)
        tok = flip_signature(make_token(alg))
        assert_invalid(get(gw, path, tok), tok, "bad_signature")


def test_signature_of_other_key_rejected(gw):
    tok = make_token("RS256", n=7)  # another RSA key pair
    assert_invalid(get(gw, "/pem/rsa/x", tok), tok, "bad_signature")
    tok = make_token("HS256", secret=HMAC_SECRET[::-1])
    assert_invalid(get(gw, "/hs/x", tok), tok, "bad_signature")


def test_truncated_token_rejected(gw):
    tok = make_token("RS256")
    head, payload, sig = tok.split(".")
    for t in (tok[: len(tok) // 2], head + "." + payload, head + "." + payload + ".",
              head, tok[:-10], "." + payload + "." + sig, head + ".." + sig):
        assert_invalid(get(gw, "/pem/rsa/x", t), t)


def test_bad_base64_rejected(gw):
    tok = make_token("HS256")
    head, payload, sig = tok.split(".")
    variants = [
        head + "." + payload[:5] + "+" + payload[6:] + "." + sig,
        head + "." + payload[:5] + "/" + payload[6:] + "." + sig,
        head + "=." + payload + "." + sig,
        head + "." + payload + "==." + sig,
        head + "." + payload + "." + sig + "=",
        head + "." + payload + "." + sig[:3] + "+" + sig[4:],
        head + "." + payload[:5] + "%" + payload[6:] + "." + sig,
    ]
    for t in variants:
        assert_invalid(get(gw, "/hs/x", t), t)


def test_header_not_json_rejected(gw):
    for t in (b64u("not json") + "." + b64u("{}") + ".abc",
              b64u('{"alg":"HS256"') + "." + b64u('{"sub":"x"}') + ".abc",
              b64u('["HS256"]') + "." + b64u('{"sub":"x"}') + ".abc"):
        assert_invalid(get(gw, "/hs/x", t), t, "malformed_token")


def test_16k_token_rejected(gw):
    tok = make_token("HS256", claims(pad="x" * 16 * 1024))
    assert len(tok) > 16 * 1024
    assert_invalid(get(gw, "/hs/x", tok), tok, "token_too_large")
    assert get(gw, "/hs/x", make_token("HS256")).status == 200  # still serving


def test_unknown_kid_rejected(gw):
    tok = make_token("RS256", kid="nobody-has-this-kid")
    assert_invalid(get(gw, "/jwks/x", tok), tok, "unknown_kid")


def test_missing_token(gw):
    for hdrs in ([], [("Authorization", "Basic dXNlcjpwYXNz")], [("Authorization", "Bearer ")],
                 [("Authorization", "Bearer")]):
        r = gw.request("GET", "/hs/x", hdrs)
        doc = assert_gateway_error(r, 401)
        assert doc["error"] == "missing_token", (hdrs, doc)
        assert r.header("www-authenticate") == "Bearer", r


def test_bearer_scheme_case_insensitive(gw):
    tok = make_token("HS256")
    r = gw.request("GET", "/hs/x", [("Authorization", "bearer   " + tok)])
    assert r.status == 200, r


def test_error_body_never_echoes_token(gw):
    """Every kind of rejection: neither the body nor the headers carry the token."""
    now = int(time.time())
    bad = [make_token("HS256", claims(exp=now - 5)), flip_signature(make_token("HS256")),
           make_token("HS256")[:-3], compact({"alg": "none"}, claims()),
           make_token("HS256", claims(nbf=now + 100)), make_token("HS256", kid="x" * 40)]
    for t in bad:
        r = get(gw, "/hs/x", t)
        assert r.status == 401, r
        assert_invalid(r, t)


# ---- time --------------------------------------------------------------------------------------


def test_leeway_honoured(gw):
    now = int(time.time())
    tok = make_token("RS256", claims(exp=now - 10, iat=now - 60))
    assert get(gw, "/leeway/x", tok).status == 200
    assert_invalid(get(gw, "/pem/rsa/x", tok), tok, "token_expired")
    tok = make_token("RS256", claims(nbf=now + 10))
    assert get(gw, "/leeway/x", tok).status == 200
    tok = make_token("RS256", claims(exp=now - 90, iat=now - 120))
    assert_invalid(get(gw, "/leeway/x", tok), tok, "token_expired")


def test_require_exp_default(gw):
    tok = make_token("HS256", {"sub": "no-exp", "iat": int(time.time())})
    assert_invalid(get(gw, "/hs/x", tok), tok)


# ---- claims, headers, sources ----------------------------------------------------------------


def test_claims_to_headers_and_client_copy_removed(gw):
    tok = make_token("HS256", claims(sub="alice", scope="read", role="admin", tenant="t-42"))
    r = gw.request("GET", "/claims/x", bearer(tok) + [("X-User-Id", "mallory"),
                                                      ("x-user-id", "root"),
                                                      ("X-Tenant", "t-evil")])
    assert r.status == 200, r
    got = backend_headers(r)
    assert hvalues(got, "X-User-Id") == ["alice"], got
    assert hvalues(got, "X-Tenant") == ["t-42"], got
    assert hvalues(got, "Authorization") == [], got  # strip_authorization: true


def test_claim_header_removed_when_claim_absent(gw):
    tok = make_token("HS256", claims(sub="bob", scope="read", role="admin"))  # no tenant
    r = gw.request("GET", "/claims/x", bearer(tok) + [("X-Tenant", "t-evil")])
    assert r.status == 200, r
    assert hvalues(backend_headers(r), "X-Tenant") == [], r


def test_authorization_kept_by_default(gw):
    tok = make_token("HS256", claims(sub="carol"))
    r = gw.request("GET", "/keepauth/x", bearer(tok) + [("X-User-Id", "mallory")])
    assert r.status == 200, r
    got = backend_headers(r)
    assert hvalues(got, "Authorization") == ["Bearer " + tok], got
    assert hvalues(got, "X-User-Id") == ["carol"], got


def test_required_claim_missing_is_403(gw):
    tok = make_token("HS256", claims(role="admin"))  # no scope
    r = get(gw, "/claims/x", tok)
    doc = assert_gateway_error(r, 403)
    assert doc["error"] == "insufficient_claims", doc
    assert tok.encode() not in r.body


def test_claim_mismatch_is_403(gw):
    for role in ("user", "Admin", "admin "):
        tok = make_token("HS256", claims(scope="read", role=role))
        r = get(gw, "/claims/x", tok)
        doc = assert_gateway_error(r, 403)
        assert doc["error"] == "insufficient_claims", doc


def test_token_from_cookie_query_header(gw):
    tok = make_token("HS256", claims(sub="dave"))
    r = gw.request("GET", "/from/x", [("Cookie", "theme=dark; session=%s; lang=en" % tok)])
    assert r.status == 200, r
    r = gw.request("GET", "/from/x?a=1&access_token=%s&b=2" % tok)
    assert r.status == 200, r
    r = gw.request("GET", "/from/x", [("X-Token", tok)])
    assert r.status == 200, r
    # Authorization is not among this route's sources.
    r = get(gw, "/from/x", tok)
    assert r.status == 401 and error_of(r) == "missing_token", r
    # A bad token in the first source found is not rescued by a later one.
    r = gw.request("GET", "/from/x", [("Cookie", "session=" + flip_signature(tok)),
                                      ("X-Token", tok)])
    assert r.status == 401, r


# ---- cache -------------------------------------------------------------------------------------


def test_same_token_1000_times(gw):
    tok = make_token("ES256", claims(sub="cached"))
    k = KeepAliveClient(gw.port)
    try:
        statuses = [k.request("/pem/ec256/%d" % i, bearer(tok)).status for i in range(1000)]
    finally:
        k.close()
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}


def test_bad_token_repeated_stays_rejected(gw):
    tok = flip_signature(make_token("ES256"))
    k = KeepAliveClient(gw.port)
    try:
        statuses = [k.request("/pem/ec256/x", bearer(tok)).status for _ in range(200)]
    finally:
        k.close()
    assert statuses == [401] * 200


def test_token_expiring_while_cached_is_refused(gw):
    tok = make_token("HS256", claims(sub="short", ttl=2))
    assert get(gw, "/hs/x", tok).status == 200
    assert get(gw, "/hs/x", tok).status == 200  # from the cache
    t0 = time.monotonic()
    last = {}

    def refused():
        r = get(gw, "/hs/x", tok)
        last["r"] = r
        return r.status == 401

    assert poll(refused, 10.0, interval=0.1), last
    assert time.monotonic() - t0 < 10.0
    assert_invalid(last["r"], tok, "token_expired")


# ---- JWKS over HTTP(S) -------------------------------------------------------------------------


def jwks_url_config(url, extra="", ca=None):
    j = "jwt: {jwks_url: %s%s%s}" % (q(url), ", jwks_ca_file: %s" % ca if ca else "",
                                     ", " + extra if extra else "")
    routes = route("api", "/api", [j]) + direct_route("open", "/open")
    return filter_config(routes=routes, workers=2)


def wait_accepted(gw, tok, timeout=10.0):
    last = {}

    def ok():
        r = get(gw, "/api/x", tok)
        last["r"] = r
        return r.status == 200

    assert poll(ok, timeout, interval=0.05), last.get("r")


def test_jwks_url_rotation(gateway, backend, jwks_server):
    idp = jwks_server(jwks(jwk("rsa", "A", n=0)))
    b = backend()
    g = gateway(jwks_url_config(idp.url, "jwks_refetch_interval: 1s, jwks_refresh: 1h"),
                B1=b.addr)
    tok_a = make_token("RS256", claims(sub="a"), kid="A", n=0)
    wait_accepted(g, tok_a)
    assert get(g, "/api/x", tok_a).status == 200  # cached now
    # Rotate: the IdP now publishes kid B only. Background refresh is 1 h away, so only the
    # unknown-kid refetch (at most once a second here) can bring B in; no restart.
    idp.set_keys(jwk("rsa", "B", n=1))
    before = idp.count()
    # Fresh kid-B tokens until one passes (the first ones may fall within the 1 s minimum
    # interval since the start-up fetch).
    seq = iter(range(10 ** 6))
    tok_b = {}

    def b_accepted():
        tok_b["t"] = make_token("RS256", claims(sub="b", jti=str(next(seq))), kid="B", n=1)
        return get(g, "/api/x", tok_b["t"]).status == 200

    assert poll(b_accepted, 5.0, interval=0.05), "kid B never accepted after the rotation"
    tok_b = tok_b["t"]
    assert 1 <= idp.count() - before <= 6, (before, idp.count())
    # A is gone from the set now: its tokens are refused, the cached one too.
    for t in (tok_a, make_token("RS256", claims(sub="a2"), kid="A", n=0)):
        r = get(g, "/api/x", t)
        assert_invalid(r, t)
    assert get(g, "/api/x", tok_b).status == 200


def test_jwks_same_token_retried_after_refetch_interval(gateway, backend, jwks_server):
    """A client retrying its (good) token whose kid the gateway does not know yet gets it
    accepted once the refetch interval has passed: a refusal inside the interval is not
    remembered past the next allowed refetch."""
    idp = jwks_server(jwks(jwk("rsa", "A", n=0)))
    b = backend()
    g = gateway(jwks_url_config(idp.url, "jwks_refetch_interval: 1s, jwks_refresh: 1h"),
                B1=b.addr)
    wait_accepted(g, make_token("RS256", kid="A", n=0))
    idp.set_keys(jwk("rsa", "A", n=0), jwk("rsa", "B", n=1))
    tok_b = make_token("RS256", claims(sub="b"), kid="B", n=1)
    before = idp.count()
    wait_accepted(g, tok_b, timeout=5.0)  # retries with one token, 50 ms apart
    assert idp.count() - before <= 6, (before, idp.count())


def test_jwks_url_forged_kids_do_not_flood_idp(gateway, backend, jwks_server):
    idp = jwks_server(jwks(jwk("ec256", "A")))
    b = backend()
    g = gateway(jwks_url_config(idp.url, "jwks_refetch_interval: 30s"), B1=b.addr)
    wait_accepted(g, make_token("ES256", kid="A"))
    before = idp.count()
    rnd = random.Random(5)
    k = KeepAliveClient(g.port)
    try:
        for i in range(50):
            kid = "".join(rnd.choice(string.ascii_letters) for _ in range(12))
            tok = make_token("ES256", claims(sub="f%d" % i), kid=kid)
            t0 = time.monotonic()
            r = k.request("/api/x", bearer(tok))
            assert r.status == 401 and error_of(r) == "unknown_kid", r
            assert time.monotonic() - t0 < 3.0
    finally:
        k.close()
    assert idp.count() - before <= 2, (before, idp.count())
    assert get(g, "/api/x", make_token("ES256", claims(sub="ok"), kid="A")).status == 200


def test_jwks_url_stale_keys_while_idp_down(gateway, backend, jwks_server):
    idp = jwks_server(jwks(jwk("ed25519", "A")))
    b = backend()
    g = gateway(jwks_url_config(idp.url, "jwks_refresh: 1s, jwks_refetch_interval: 1s, "
                                         "jwks_timeout: 500ms"), B1=b.addr)
    wait_accepted(g, make_token("EdDSA", kid="A"))
    # The IdP answers 500 for a while: background refreshes fail, the last good set stays.
    idp.status = 500
    n = idp.count()
    assert idp.wait_fetches(n + 2, timeout=10.0), "no background refresh seen"
    r = get(g, "/api/x", make_token("EdDSA", claims(sub="while-500"), kid="A"))
    assert r.status == 200, r
    # Then it goes away completely.
    idp.stop()
    for i in range(20):
        r = get(g, "/api/x", make_token("EdDSA", claims(sub="down-%d" % i), kid="A"))
        assert r.status == 200, r
    # An unknown kid while down: refused (401), not a hang, and the known kid still works.
    t0 = time.monotonic()
    r = get(g, "/api/x", make_token("EdDSA", kid="Z"))
    assert r.status in (401, 503) and time.monotonic() - t0 < 3.0, r
    assert get(g, "/api/x", make_token("EdDSA", claims(sub="after"), kid="A")).status == 200
    assert g.alive()


def test_jwks_url_never_fetched_is_503(gateway, backend, jwks_server):
    idp = jwks_server(jwks(jwk("rsa", "A")))
    idp.status = 500
    b = backend()
    g = gateway(jwks_url_config(idp.url, "jwks_timeout: 500ms"), B1=b.addr)
    r = get(g, "/api/x", make_token("RS256", kid="A"))
    doc = assert_gateway_error(r, 503)
    assert doc["error"] == "jwks_unavailable", doc
    # The IdP recovers: keys arrive (refetch or refresh) and the token passes.
    idp.status = 200
    wait_accepted(g, make_token("RS256", claims(sub="later"), kid="A"), timeout=15.0)


def test_jwks_https_with_ca_file(gateway, backend, jwks_server, tmp_path):
    ca, cert, key = tls_files(tmp_path)
    idp = jwks_server(jwks(jwk("ec384", "A")), certfile=cert, keyfile=key)
    b = backend()
    g = gateway(jwks_url_config(idp.url, ca=ca), B1=b.addr)
    wait_accepted(g, make_token("ES384", kid="A"))
    assert idp.count() >= 1


def test_jwks_https_without_ca_file_fails_closed(gateway, backend, jwks_server, tmp_path):
    ca, cert, key = tls_files(tmp_path)
    idp = jwks_server(jwks(jwk("ec384", "A")), certfile=cert, keyfile=key)
    b = backend()
    g = gateway(jwks_url_config(idp.url, "jwks_timeout: 1s"), B1=b.addr)
    tok = make_token("ES384", kid="A")
    for _ in range(3):
        t0 = time.monotonic()
        r = get(g, "/api/x", tok)
        assert r.status in (401, 503), r
        assert time.monotonic() - t0 < 4.0
    if r.status == 503:
        assert error_of(r) == "jwks_unavailable", r
    # Still serving everything else.
    assert g.request("GET", "/open").status == 200
    assert g.alive()


def test_jwks_file_reread_when_changed(gateway, backend, tmp_path):
    path = write_json(tmp_path, "jwks.json", jwks(jwk("rsa", "A", n=0)))
    b = backend()
    routes = route("api", "/api", ["jwt: {jwks_file: %s, jwks_refresh: 1s}" % path])
    g = gateway(filter_config(routes=routes), B1=b.addr)
    assert get(g, "/api/x", make_token("RS256", kid="A", n=0)).status == 200
    assert get(g, "/api/x", make_token("RS256", kid="B", n=1)).status == 401
    write_json(tmp_path, "jwks.json", jwks(jwk("rsa", "B", n=1)))
    os.utime(path, (time.time() + 5, time.time() + 5))  # a visibly newer mtime
    wait_accepted(g, make_token("RS256", claims(sub="b"), kid="B", n=1), timeout=15.0)


def test_caches_off_still_verify_every_request(gw):
    # cache_size: 0, negative_cache_size: 0: the good token passes every time, the bad one
    # fails every time, alternating on one connection (nothing remembered either way).
    good = make_token("ES256", claims(sub="nocache"))
    bad = flip_signature(good)
    k = KeepAliveClient(gw.port)
    try:
        seen = [(k.request("/nocache/%d" % i, bearer(t)).status)
                for i in range(100) for t in (good, bad)]
    finally:
        k.close()
    assert seen == [200, 401] * 100, seen


def test_client_gone_while_waiting_for_unknown_kid_refetch(gateway, backend, jwks_server):
    # A kid-B token parks its request while the refetch runs; the client resets meanwhile.
    # The jwt filter must forget the waiter (on_cancel): when the slow IdP finally answers,
    # nothing may touch the freed request (the ASan run reports it), and B then works.
    import socket
    import struct
    idp = jwks_server(jwks(jwk("rsa", "A", n=0)))
    b = backend()
    g = gateway(jwks_url_config(idp.url, "jwks_refetch_interval: 1s, jwks_refresh: 1h"),
                B1=b.addr)
    wait_accepted(g, make_token("RS256", claims(sub="a"), kid="A", n=0))
    idp.set_keys(jwk("rsa", "A", n=0), jwk("rsa", "B", n=1))
    idp.hold()
    socks = []
    try:
        before = idp.arrived
        tok = make_token("RS256", claims(sub="b"), kid="B", n=1)
        req = ("GET /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n\r\n"
               % tok).encode()

        def parked():
            # Requests inside the refetch interval are refused at once; the first one after
            # it starts the (held) fetch and stays parked.
            s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
            s.sendall(req)
            socks.append(s)
            return idp.arrived > before

        assert poll(parked, 5.0, interval=0.05), "no refetch started"
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        socks = []
    finally:
        for s in socks:
            s.close()
        idp.release()
    assert poll(lambda: get(g, "/api/x", tok).status == 200, 5.0), g.diag()
