"""The admin listener's HTML status page, rendered by headless Chromium (Debian's `chromium`
package; skipped when it is not installed).

The page is loaded with `--dump-dom` after its scripts ran for a few seconds of virtual time,
and its DOM is compared with what /status, /routes and /upstreams say at that moment; a
screenshot must show a rendered page (the header's colour where the header is, many colours).
The page must fetch nothing from anywhere but the admin listener.
"""

import html.parser
import os
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from helpers import poll
from peers import dead_port
from test_admin import admin, get_json

TOKEN = "page-token-0123456789"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")


def page_config(token_file=None):
    text = ("workers: 2\n"
            "drain_timeout: 3s\n"
            "listeners:\n"
            "  - name: public\n"
            "    address: 127.0.0.1:$PORT_public\n"
            "upstreams:\n"
            "  - name: app\n"
            "    endpoints:\n"
            "      - {address: $B1, zone: a}\n"
            "      - {address: $DEAD, zone: b}\n"
            "    health:\n"
            "      passive: {consecutive_failures: 1, ejection: 5m}\n"
            "  - name: other\n"
            "    balance: least_request\n"
            "    endpoints:\n"
            "      - {address: $B1, weight: 5}\n"
            "routes:\n"
            "  - name: api\n"
            "    match: {path_prefix: /api, methods: [GET]}\n"
            "    upstream: other\n"
            "  - name: hello\n"
            "    match: {path: /hello}\n"
            "    direct_response: {status: 200, body: hi}\n"
            "  - name: rest\n"
            "    match: {path_prefix: /}\n"
            "    upstream: app\n"
            "admin:\n"
            "  address: 127.0.0.1:$PORT_admin\n")
    if token_file:
        text += "  token_file: %s\n" % token_file
    return text


def chromium(tmp_path, url, *args, timeout=90):
    """Runs headless Chromium on `url` with its own profile and no proxy; returns stdout."""
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--no-proxy-server", "--disable-extensions", "--disable-background-networking",
           "--user-data-dir=%s" % profile, "--window-size=1280,1024"] + list(args) + [url]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    return r.stdout


def dump_dom(tmp_path, url):
    return chromium(tmp_path, url, "--dump-dom", "--virtual-time-budget=4000")


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], []

    def all_text(self):
        return "".join(self.text + [c.all_text() for c in self.children])

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def find(self, **attrs):
        return [n for n in self.walk()
                if all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def one(self, **attrs):
        found = self.find(**attrs)
        assert len(found) == 1, (attrs, len(found))
        return found[0]

    def with_attr(self, name):
        return [n for n in self.walk() if name in n.attrs]


VOID = {"meta", "link", "br", "img", "input", "hr", "area", "base", "col", "source", "wbr"}


class DomParser(html.parser.HTMLParser):
    """Just enough of a DOM: elements with attributes and text."""

    def __init__(self):
        super().__init__()
        self.root = Node("#root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        n = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur)
        self.cur.children.append(n)
        if tag not in VOID:
            self.cur = n

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def parse(text):
    p = DomParser()
    p.feed(text)
    return p.root


def read_png(path):
    """Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes) into
    (width, height, rows of (r, g, b) tuples)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(w)])
        prev = line
    return w, h, rows


@pytest.fixture
def page_gateway(gateway, backend):
    """A gateway whose `app` upstream has one endpoint ejected (a dead port) and which served
    a known number of requests."""
    b = backend()
    dead = "127.0.0.1:%d" % dead_port()
    g = gateway(page_config(), B1=b.addr, DEAD=dead)

    def dead_is_open():
        g.request("GET", "/x")
        eps = {e["address"]: e for e in get_json(g, "/upstreams/app")["endpoints"]}
        return eps[dead]["state"] == "open"

    assert poll(dead_is_open, timeout=10), "the dead endpoint was never ejected"
    for _ in range(4):
        assert g.request("GET", "/hello").status == 200
        assert g.request("GET", "/api/v").status == 200
    return g, dead


def test_dom_matches_the_api(page_gateway, tmp_path):
    g, dead = page_gateway
    base = "http://127.0.0.1:%d" % g.ports["admin"]
    dom = parse(dump_dom(tmp_path, base + "/"))
    status = get_json(g, "/status")
    routes = get_json(g, "/routes")
    ups = get_json(g, "/upstreams")

    body = [n for n in dom.walk() if n.tag == "body"][0]
    assert body.attrs["data-loaded"] == "1", dom.one(id="error").all_text()
    assert int(body.attrs["data-polls"]) >= 2
    assert dom.one(id="version").attrs["data-value"] == status["version"]
    assert dom.one(id="pid").attrs["data-value"] == str(g.pid)
    assert dom.one(id="generation").attrs["data-value"] == "1"
    assert dom.one(id="state").attrs["data-value"] == "ready"
    assert dom.one(id="draining").attrs["data-value"] == "false"
    assert dom.one(id="workers").attrs["data-value"] == "2"
    # the counter: nothing was sent to the public listener since the page loaded, and the
    # page's own polling is not traffic
    total = dom.one(id="requests-total")
    assert total.attrs["data-value"] == str(status["requests"]["total"]), (
        total.attrs, status["requests"])
    assert status["requests"]["total"] >= 9
    assert total.all_text() == str(status["requests"]["total"])

    rows = dom.with_attr("data-route")
    assert [r.attrs["data-route"] for r in rows] == [r["name"] for r in routes]
    for row, r in zip(rows, routes):
        target = row.one(data_field="target").attrs["data-value"]
        expect = ("direct:%d" % r["direct_response"]["status"] if r.get("direct_response")
                  else r["upstream"])
        assert target == expect, (target, r)
        assert row.one(data_field="requests").attrs["data-value"] == str(
            r["requests"]["total"])

    sections = [n for n in dom.with_attr("data-upstream") if n.tag == "div"]
    assert [s.attrs["data-upstream"] for s in sections] == [u["name"] for u in ups]
    for sec, u in zip(sections, ups):
        shown = {tr.attrs["data-endpoint"]: tr for tr in sec.with_attr("data-endpoint")}
        assert set(shown) == {e["address"] for e in u["endpoints"]}
        for e in u["endpoints"]:
            tr = shown[e["address"]]
            assert tr.attrs["data-state"] == e["state"], (e, tr.attrs)
            assert tr.attrs["data-healthy"] == ("true" if e["healthy"] else "false")
            assert tr.attrs["data-active"] == e["active_check"]
            assert tr.one(data_field="zone").all_text() == (e["zone"] or "-")
    app = [s for s in sections if s.attrs["data-upstream"] == "app"][0]
    assert app.one(data_endpoint=dead).attrs["data-state"] == "open"

    # the charts got samples from the polls
    assert int(dom.one(id="rate-chart").attrs["data-samples"]) >= 2
    assert int(dom.one(id="latency-chart").attrs["data-samples"]) >= 2


def test_counter_follows_traffic(page_gateway, tmp_path):
    g, _ = page_gateway
    base = "http://127.0.0.1:%d/" % g.ports["admin"]
    for _ in range(13):
        assert g.request("GET", "/hello").status == 200
    want = get_json(g, "/status")["requests"]["total"]
    dom = parse(dump_dom(tmp_path, base))
    assert dom.one(id="requests-total").attrs["data-value"] == str(want)


def test_screenshot_is_rendered(page_gateway, tmp_path):
    g, _ = page_gateway
    shot = tmp_path / "status.png"
    chromium(tmp_path, "http://127.0.0.1:%d/" % g.ports["admin"],
             "--screenshot=%s" % shot, "--virtual-time-budget=3000")
    assert shot.exists()
    assert shot.stat().st_size > 20 * 1024, shot.stat().st_size
    w, h, rows = read_png(str(shot))
    assert (w, h) == (1280, 1024)
    # the header bar (#1d2330) across the top, the light page background below it
    assert rows[10][10] == (0x1d, 0x23, 0x30), rows[10][10]
    assert rows[h // 2][3] == (0xf6, 0xf7, 0xf9), rows[h // 2][3]
    colours = {px for y in range(0, h, 8) for px in rows[y][::8]}
    assert len(colours) > 20, len(colours)


def test_page_makes_no_external_requests(page_gateway):
    g, _ = page_gateway
    r = admin(g, "GET", "/")
    assert r.status == 200
    assert r.header("Content-Type") == "text/html; charset=utf-8"
    text = r.body.decode()
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"(?i)<(link|img|iframe|object|embed)\b", text)
    assert not re.search(r"(?i)<script[^>]*\bsrc=", text)
    assert not re.search(r"(?i)@import|url\(", text)
    csp = r.header("Content-Security-Policy")
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp, csp
    # /status.html is the same page
    assert admin(g, "GET", "/status.html").body == r.body


def test_page_with_token_in_fragment(gateway, backend, tmp_path):
    b = backend()
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    g = gateway(page_config(token_file=str(tok)), B1=b.addr, DEAD="127.0.0.1:%d" % dead_port())
    base = "http://127.0.0.1:%d/" % g.ports["admin"]
    # the page itself needs no token (it holds no data)...
    assert admin(g, "GET", "/").status == 200
    # ...but without one its data requests are refused, and it says how to fix that
    dom = parse(dump_dom(tmp_path, base))
    body = [n for n in dom.walk() if n.tag == "body"][0]
    assert body.attrs["data-loaded"] == "0"
    assert "#token=" in dom.one(id="error").all_text()
    # with the token in the fragment it loads
    (tmp_path / "second").mkdir()
    dom = parse(dump_dom(tmp_path / "second", base + "#token=" + TOKEN))
    body = [n for n in dom.walk() if n.tag == "body"][0]
    assert body.attrs["data-loaded"] == "1", dom.one(id="error").all_text()
    assert dom.one(id="generation").attrs["data-value"] == "1"
    assert [r.attrs["data-route"] for r in dom.with_attr("data-route")] == [
        "api", "hello", "rest"]
    # the fragment never reaches the server, so the token is not in the log either
    assert TOKEN not in g.stderr_text()
