"""Request smuggling and malformed requests: each must get 400 and the connection closed, and
the backend must never see the request hidden behind it."""

import pytest

from client import build_request
from helpers import proxy_config

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


def head(*lines, method=b"POST", target=b"/first", version=b"HTTP/1.1"):
    return method + b" " + target + b" " + version + b"\r\n" + b"".join(
        ln + b"\r\n" for ln in lines) + b"\r\n"


H = b"Host: a"

CASES = {
    # framing conflicts
    "cl_and_te": head(H, b"Content-Length: 6", b"Transfer-Encoding: chunked") + b"0\r\n\r\n"
    + SMUGGLED,
    "te_and_cl": head(H, b"Transfer-Encoding: chunked", b"Content-Length: 6") + b"0\r\n\r\n"
    + SMUGGLED,
    "duplicate_cl_equal": head(H, b"Content-Length: 5", b"Content-Length: 5") + b"hello"
    + SMUGGLED,
    "duplicate_cl_different": head(H, b"Content-Length: 5", b"Content-Length: 41") + b"hello"
    + SMUGGLED,
    "cl_list": head(H, b"Content-Length: 5, 5") + b"hello" + SMUGGLED,
    "cl_plus": head(H, b"Content-Length: +5") + b"hello" + SMUGGLED,
    "cl_trailing_garbage": head(H, b"Content-Length:  5x") + b"hello" + SMUGGLED,
    "cl_negative": head(H, b"Content-Length: -5") + b"hello" + SMUGGLED,
    "cl_hex": head(H, b"Content-Length: 0x5") + b"hello" + SMUGGLED,
    "cl_overflow": head(H, b"Content-Length: 99999999999999999999999") + b"hello" + SMUGGLED,
    "te_chunked_identity": head(H, b"Transfer-Encoding: chunked, identity") + b"0\r\n\r\n"
    + SMUGGLED,
    "te_identity": head(H, b"Transfer-Encoding: identity") + b"0\r\n\r\n" + SMUGGLED,
    "te_xchunked": head(H, b"Transfer-Encoding: xchunked") + b"0\r\n\r\n" + SMUGGLED,
    "te_two_headers": head(H, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
    + b"0\r\n\r\n" + SMUGGLED,
    "te_chunked_twice": head(H, b"Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n"
    + SMUGGLED,
    # header syntax
    "obs_fold": head(H, b"X-Foo: a", b"  b", b"Content-Length: 0") + SMUGGLED,
    "obs_fold_on_te": head(H, b"Transfer-Encoding:", b" chunked") + b"0\r\n\r\n" + SMUGGLED,
    "space_before_colon_host": head(b"Host : x") + SMUGGLED,
    "space_before_colon_cl": head(H, b"Content-Length : 5") + b"hello" + SMUGGLED,
    "tab_before_colon_te": head(H, b"Transfer-Encoding\t: chunked") + b"0\r\n\r\n" + SMUGGLED,
    "nul_in_value": head(H, b"X-Foo: a\x00b") + SMUGGLED,
    "cr_in_value": head(H, b"X-Foo: a\rb") + SMUGGLED,
    "empty_header_name": head(H, b": empty") + SMUGGLED,
    "bare_lf_everywhere": b"GET /first HTTP/1.1\nHost: a\n\n" + SMUGGLED,
    "bare_lf_in_headers": b"GET /first HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n" + SMUGGLED,
    "bare_cr_line_end": b"GET /first HTTP/1.1\rHost: a\r\n\r\n" + SMUGGLED,
    # chunked body framing
    "chunk_size_zz": head(H, b"Transfer-Encoding: chunked") + b"zz\r\nhello\r\n0\r\n\r\n"
    + SMUGGLED,
    "chunk_size_negative": head(H, b"Transfer-Encoding: chunked") + b"-1\r\nhello\r\n0\r\n\r\n"
    + SMUGGLED,
    "chunk_size_huge": head(H, b"Transfer-Encoding: chunked")
    + b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    "chunk_size_empty": head(H, b"Transfer-Encoding: chunked") + b"\r\nhello\r\n0\r\n\r\n"
    + SMUGGLED,
    "chunk_size_0x": head(H, b"Transfer-Encoding: chunked") + b"0x5\r\nhello\r\n0\r\n\r\n"
    + SMUGGLED,
    "chunk_data_no_crlf": head(H, b"Transfer-Encoding: chunked") + b"5\r\nhelloXX0\r\n\r\n"
    + SMUGGLED,
    "chunk_data_too_long": head(H, b"Transfer-Encoding: chunked") + b"3\r\nhello\r\n0\r\n\r\n"
    + SMUGGLED,
    # request line
    "double_space": b"GET  /first HTTP/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,
    "extra_token": b"GET /first HTTP/1.1 x\r\nHost: a\r\n\r\n" + SMUGGLED,
    "bad_protocol": b"GET /first FOO/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,
    "lowercase_protocol": b"GET /first http/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,
    "no_version": b"GET /first\r\nHost: a\r\n\r\n" + SMUGGLED,
    "space_in_target": b"GET /fi rst HTTP/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,
    "tab_separator": b"GET\t/first HTTP/1.1\r\nHost: a\r\n\r\n" + SMUGGLED,
    # Host
    "missing_host_http11": b"GET /first HTTP/1.1\r\nX-A: b\r\n\r\n" + SMUGGLED,
    "two_host_headers": b"GET /first HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + SMUGGLED,
    "bad_host_value": b"GET /first HTTP/1.1\r\nHost: a b\r\n\r\n" + SMUGGLED,
}


@pytest.fixture(scope="module")
def gw(module_gateway_factory, module_backend):
    b = module_backend()
    g = module_gateway_factory.start(proxy_config(), B1=b.addr)
    g.backend = b
    return g


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_with_400_and_closed(gw, case):
    with gw.connect() as c:
        c.send(CASES[case])
        r = c.read_response()
        assert r.status == 400, r
        assert c.closed(timeout=3), "connection still open after 400 (extra bytes: %r)" % (
            bytes(c.buf[:200]),)
    assert "/smuggled" not in gw.backend.paths()


def test_backend_never_saw_smuggled_requests(gw):
    # Runs after the cases above (file order); also catches a smuggled request that reached
    # the backend late, after the client had gone.
    assert "/smuggled" not in gw.backend.paths(), gw.backend.paths()


def test_rejections_do_not_disturb_other_clients(gw):
    r = gw.request("POST", "/ok", body=b"hello")
    assert r.status == 200 and r.json()["body_len"] == 5


def test_lowercase_method_is_a_token_not_an_error(gw):
    # Methods are case-sensitive tokens: `get` is valid syntax (and routes on any method).
    with gw.connect() as c:
        c.send(b"get /lower HTTP/1.1\r\nHost: a\r\n\r\n")
        r = c.read_response()
    assert r.status != 400, r


def test_valid_chunked_with_following_request_is_not_rejected(gw):
    # The control case: correct framing, the second request is a genuine pipelined request.
    with gw.connect() as c:
        c.send(head(H, b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n"
               + build_request("GET", "/second"))
        r1 = c.read_response()
        r2 = c.read_response()
    assert r1.json()["body_len"] == 5
    assert r2.json()["path"] == "/second"
