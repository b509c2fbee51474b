"""A strict parser of the Prometheus text exposition format (version 0.0.4), for tests.

parse(text) returns {family name: Family} and raises ParseError on anything a scraper could
reject or misread: a malformed line, a bad metric or label name, an unknown escape in a label
value, a value that is not a float, HELP or TYPE given twice or TYPE after the family's first
sample, a family's samples not kept together, a sample name that does not belong to its
family's type, a duplicate series, a negative counter, and histograms whose buckets are not
cumulative, lack +Inf, or disagree with _count, or that lack _sum or _count.

Typical use:

    fams = promparse.parse(text)
    fams["sluice_requests_total"].value(route="api", code="2xx")
    promparse.value(fams, "sluice_connections_open")
    fams["sluice_request_duration_seconds"].histogram(route="api")  # -> Histogram
"""

import math
import re

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME_AT = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
FLOAT = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|Inf|inf|NaN)\Z")


class ParseError(ValueError):
    pass


class Sample:
    __slots__ = ("name", "labels", "value", "timestamp", "line")

    def __init__(self, name, labels, value, timestamp, line):
        self.name = name
        self.labels = labels
        self.value = value
        self.timestamp = timestamp
        self.line = line

    def __repr__(self):
        return "Sample(%s%r = %r)" % (self.name, self.labels, self.value)


class Histogram:
    """One histogram series: buckets as [(upper bound, cumulative count)], +Inf last."""

    def __init__(self, buckets, sum_, count):
        self.buckets = buckets
        self.sum = sum_
        self.count = count

    def quantile(self, q):
        """The upper bound of the bucket holding quantile q (what PromQL interpolates
        within); +Inf when it falls past the last finite bound; None with no observations."""
        if self.count == 0:
            return None
        rank = q * self.count
        for le, c in self.buckets:
            if c >= rank:
                return le
        return math.inf


class Family:
    def __init__(self, name):
        self.name = name
        self.type = None
        self.help = None
        self.samples = []

    def __repr__(self):
        return "Family(%s %s, %d samples)" % (self.name, self.type, len(self.samples))

    def find(self, name=None, **labels):
        """Samples named `name` (default: the family's name) whose labels include `labels`."""
        name = name or self.name
        return [s for s in self.samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name=None, **labels):
        """The value of the one sample with exactly these labels; KeyError when absent."""
        name = name or self.name
        for s in self.samples:
            if s.name == name and s.labels == labels:
                return s.value
        raise KeyError("%s%r not in %r" % (name, labels, [(x.name, x.labels) for x in self.samples]))

    def series(self):
        """The label sets of the family's series (for histograms, without `le`)."""
        out = []
        for s in self.samples:
            ls = {k: v for k, v in s.labels.items() if k != "le"}
            if ls not in out:
                out.append(ls)
        return out

    def histogram(self, **labels):
        if self.type != "histogram":
            raise ParseError("%s is a %s, not a histogram" % (self.name, self.type))
        buckets = [(float(s.labels["le"].replace("Inf", "inf")), s.value)
                   for s in self.samples if s.name == self.name + "_bucket"
                   and {k: v for k, v in s.labels.items() if k != "le"} == labels]
        if not buckets:
            raise KeyError("%s%r has no buckets" % (self.name, labels))
        return Histogram(sorted(buckets), self.value(self.name + "_sum", **labels),
                         self.value(self.name + "_count", **labels))


def value(families, name, **labels):
    """The value of sample `name` with exactly `labels`, looking it up in its family."""
    return family_of(families, name).value(name, **labels)


def family_of(families, sample_name):
    if sample_name in families:
        return families[sample_name]
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return families[sample_name[: -len(suffix)]]
    raise KeyError("no family for %s" % sample_name)


def _float(text, what, lineno):
    if not FLOAT.match(text):
        raise ParseError("line %d: %s %r is not a float" % (lineno, what, text))
    return float(text.replace("Inf", "inf").replace("NaN", "nan"))


def _parse_labels(line, pos, lineno):
    """Parses `{name="value",...}` starting at line[pos] == '{'; returns (labels, end)."""
    labels = {}
    pos += 1
    n = len(line)
    while True:
        if pos < n and line[pos] == "}":
            return labels, pos + 1
        m = LABEL_NAME_AT.match(line, pos)
        if not m:
            raise ParseError("line %d: bad label name at column %d" % (lineno, pos + 1))
        lname = m.group(0)
        if lname.startswith("__"):
            raise ParseError("line %d: label name %s is reserved" % (lineno, lname))
        pos = m.end()
        if line[pos:pos + 2] != '="':
            raise ParseError("line %d: expected =\" after label %s" % (lineno, lname))
        pos += 2
        out = []
        while True:
            if pos >= n:
                raise ParseError("line %d: unterminated value of label %s" % (lineno, lname))
            ch = line[pos]
            if ch == "\\":
                esc = line[pos + 1:pos + 2]
                if esc == "\\":
                    out.append("\\")
                elif esc == '"':
                    out.append('"')
                elif esc == "n":
                    out.append("\n")
                else:
                    raise ParseError("line %d: invalid escape \\%s in label %s"
                                     % (lineno, esc, lname))
                pos += 2
            elif ch == '"':
                pos += 1
                break
            else:
                out.append(ch)
                pos += 1
        if lname in labels:
            raise ParseError("line %d: label %s given twice" % (lineno, lname))
        labels[lname] = "".join(out)
        if pos < n and line[pos] == ",":
            pos += 1
            continue
        if pos < n and line[pos] == "}":
            return labels, pos + 1
        raise ParseError("line %d: expected , or } at column %d" % (lineno, pos + 1))


def _belongs(fam, sample_name, labels, lineno):
    t = fam.type or "untyped"
    base = fam.name
    if t == "histogram":
        if sample_name == base + "_bucket":
            if "le" not in labels:
                raise ParseError("line %d: %s without le" % (lineno, sample_name))
            return
        if sample_name in (base + "_sum", base + "_count"):
            if "le" in labels:
                raise ParseError("line %d: %s with le" % (lineno, sample_name))
            return
        raise ParseError("line %d: %s does not belong to histogram %s" % (lineno, sample_name, base))
    if t == "summary":
        if sample_name == base or sample_name in (base + "_sum", base + "_count"):
            return
        raise ParseError("line %d: %s does not belong to summary %s" % (lineno, sample_name, base))
    if sample_name != base:
        raise ParseError("line %d: sample %s inside family %s" % (lineno, sample_name, base))


def _family_name_for(sample_name, families):
    """The family a sample belongs to: its own name, or a declared histogram or summary it is
    a _bucket/_sum/_count of."""
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix):
            base = sample_name[: -len(suffix)]
            f = families.get(base)
            if f is not None and f.type in ("histogram", "summary"):
                return base
    return sample_name


def _unescape_help(rest, lineno, name):
    out = []
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\":
            esc = rest[i + 1:i + 2]
            if esc not in ("\\", "n"):
                raise ParseError("line %d: invalid escape in HELP of %s" % (lineno, name))
            out.append("\n" if esc == "n" else "\\")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


SAMPLE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def parse(text, require_type=True):
    """Parses a whole exposition. With `require_type`, every sample needs a TYPE line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if text and not text.endswith("\n"):
        raise ParseError("the exposition does not end with a newline")
    families = {}
    closed = set()  # families whose group of lines ended: another family's line came after
    current = [None]
    seen = set()

    def enter(name, lineno):
        """Every line of a family (HELP, TYPE, samples) must come in one group."""
        if name == current[0]:
            return
        if name in closed:
            raise ParseError("line %d: lines of %s are not together" % (lineno, name))
        if current[0] is not None:
            closed.add(current[0])
        current[0] = name

    for lineno, line in enumerate(text.split("\n")[:-1] if text else [], 1):
        if line.strip() == "":
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) < 2 or parts[0] != "#" or parts[1] not in ("HELP", "TYPE"):
                continue  # a plain comment
            if len(parts) < 3 or not METRIC_NAME.match(parts[2]):
                raise ParseError("line %d: %s without a valid metric name" % (lineno, parts[1]))
            name = parts[2]
            rest = parts[3] if len(parts) > 3 else ""
            enter(name, lineno)
            fam = families.setdefault(name, Family(name))
            if parts[1] == "HELP":
                if fam.help is not None:
                    raise ParseError("line %d: second HELP for %s" % (lineno, name))
                fam.help = _unescape_help(rest, lineno, name)
            else:
                if fam.type is not None:
                    raise ParseError("line %d: second TYPE for %s" % (lineno, name))
                if fam.samples:
                    raise ParseError("line %d: TYPE for %s after its samples" % (lineno, name))
                if rest not in TYPES:
                    raise ParseError("line %d: unknown type %r" % (lineno, rest))
                fam.type = rest
            continue
        m = SAMPLE_NAME.match(line)
        if not m:
            raise ParseError("line %d: bad sample line %r" % (lineno, line))
        sname = m.group(0)
        pos = m.end()
        labels = {}
        if pos < len(line) and line[pos] == "{":
            labels, pos = _parse_labels(line, pos, lineno)
        if pos >= len(line) or line[pos] != " ":
            raise ParseError("line %d: expected a space before the value: %r" % (lineno, line))
        fields = line[pos + 1:].split(" ")
        if len(fields) not in (1, 2) or "" in fields:
            raise ParseError("line %d: expected value [timestamp]: %r" % (lineno, line))
        v = _float(fields[0], "value", lineno)
        ts = None
        if len(fields) == 2:
            if not re.match(r"-?\d+\Z", fields[1]):
                raise ParseError("line %d: bad timestamp %r" % (lineno, fields[1]))
            ts = int(fields[1])
        fname = _family_name_for(sname, families)
        if fname not in families and require_type:
            raise ParseError("line %d: sample %s without a TYPE line" % (lineno, sname))
        enter(fname, lineno)
        fam = families.setdefault(fname, Family(fname))
        if fam.type is None and require_type:
            raise ParseError("line %d: sample %s without a TYPE line" % (lineno, sname))
        _belongs(fam, sname, labels, lineno)
        key = (sname, tuple(sorted(labels.items())))
        if key in seen:
            raise ParseError("line %d: duplicate series %s%r" % (lineno, sname, labels))
        seen.add(key)
        if fam.type == "counter" and not v >= 0:
            raise ParseError("line %d: counter %s is %r" % (lineno, sname, v))
        fam.samples.append(Sample(sname, labels, v, ts, lineno))
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
    return families


def _check_histogram(fam):
    groups = {}
    for s in fam.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        g = groups.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if s.name.endswith("_bucket"):
            le = s.labels["le"]
            if not FLOAT.match(le):
                raise ParseError("%s: le=%r is not a float" % (fam.name, le))
            g["buckets"].append((float(le.replace("Inf", "inf")), s.value, s.line))
        elif s.name.endswith("_sum"):
            g["sum"] = s.value
        else:
            g["count"] = s.value
    for key, g in groups.items():
        where = "%s%r" % (fam.name, dict(key))
        if not g["buckets"]:
            raise ParseError("%s: no buckets" % where)
        if g["sum"] is None or g["count"] is None:
            raise ParseError("%s: _sum or _count missing" % where)
        bs = g["buckets"]  # in the order they came
        for a, b in zip(bs, bs[1:]):
            if not a[0] < b[0]:
                raise ParseError("%s: buckets not in increasing le order (line %d)" % (where, b[2]))
        if bs[-1][0] != math.inf:
            raise ParseError("%s: no +Inf bucket" % where)
        prev = 0
        for le, c, _ in bs:
            if c < prev:
                raise ParseError("%s: bucket le=%r (%r) below the one before (%r)"
                                 % (where, le, c, prev))
            prev = c
        if bs[-1][1] != g["count"]:
            raise ParseError("%s: +Inf bucket %r != _count %r" % (where, bs[-1][1], g["count"]))
        if g["count"] < 0 or not g["sum"] == g["sum"]:
            raise ParseError("%s: bad _count or _sum" % where)
