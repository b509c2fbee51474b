#include "proxy/epfile.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config/config.h"
#include "config/errors.h"
#include "config/yaml_tree.h"
#include "core/fmt.h"
#include "core/log.h"
#include "core/loop.h"

/* ---- parsing ------------------------------------------------------------------------------ */

/* The error nearest the start of the file. Errors are found in two passes (the YAML tree,
 * then the walk over it, then duplicates across the whole list), so "first found" is not
 * "first in the file"; keeping the smallest position makes the report independent of that. */
struct first_err {
    bool set;
    int line, col;
    char msg[384];
};

static void fail_at(struct first_err *fe, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void fail_at(struct first_err *fe, int line, int col, const char *fmt, ...)
{
    /* On a tie the earlier report wins: the tree's own error explains a null placeholder
     * (an alias) better than the walk's "got null" at the same place. */
    if (fe->set && (line > fe->line || (line == fe->line && col >= fe->col)))
        return;
    fe->set = true;
    fe->line = line;
    fe->col = col;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fe->msg, sizeof(fe->msg), fmt, ap);
    va_end(ap);
}

static void fail_node(struct first_err *fe, const struct sl_yaml_node *n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fail_node(struct first_err *fe, const struct sl_yaml_node *n, const char *fmt, ...)
{
    char msg[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fail_at(fe, n->line, n->col, "%s", msg);
}

static bool is_str(const struct sl_yaml_node *n)
{
    return n->kind == SL_YAML_SCALAR && !n->is_null;
}

static bool key_is(const struct sl_yaml_node *k, const char *name)
{
    size_t len = strlen(name);
    return k->len == len && memcmp(k->str, name, len) == 0;
}

/*
 * "ip:port" or "[ipv6]:port" into `ss`. Not the config loader's address parser: that one
 * accepts host names (resolved at load time), and its messages say host where this file
 * allows only IP literals. Returns NULL or why the address is invalid.
 */
static const char *parse_ip_port(const char *s, size_t len, struct sockaddr_storage *ss,
                                 socklen_t *ss_len)
{
    char host[INET6_ADDRSTRLEN + 1];
    const char *port;
    size_t hlen;
    bool v6 = len > 0 && s[0] == '[';
    if (v6) {
        const char *end = memchr(s, ']', len);
        if (!end || (size_t)(end - s) + 1 >= len || end[1] != ':')
            return "expected [ipv6]:port";
        hlen = (size_t)(end - s) - 1;
        if (hlen >= sizeof(host))
            return "invalid IPv6 address";
        memcpy(host, s + 1, hlen);
        port = end + 2;
    } else {
        const char *colon = memrchr(s, ':', len);
        if (!colon)
            return "expected ip:port (the port is missing)";
        hlen = (size_t)(colon - s);
        if (memchr(s, ':', hlen))
            return "IPv6 addresses need brackets, e.g. [::1]:80";
        if (hlen == 0)
            return "expected ip:port (the IP address is missing)";
        port = colon + 1;
        /* Too long for an IPv4 literal: only a host name could be this long. */
        if (hlen >= sizeof(host))
            hlen = sizeof(host) - 1;
        memcpy(host, s, hlen);
    }
    host[hlen] = '\0';

    size_t plen = len - (size_t)(port - s);
    uint32_t p = 0;
    bool port_ok = plen >= 1 && plen <= 5;
    for (size_t i = 0; port_ok && i < plen; i++) {
        port_ok = port[i] >= '0' && port[i] <= '9';
        p = p * 10 + (uint32_t)(port[i] - '0');
    }
    if (!port_ok || p == 0 || p > 65535)
        return "the port must be a number in 1..65535";

    memset(ss, 0, sizeof(*ss));
    if (v6) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
        if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1)
            return "invalid IPv6 address";
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)p);
        *ss_len = sizeof(*a6);
        return NULL;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
        return "not an IP address (host names are not allowed: resolving them would block the "
               "control loop)";
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)p);
    *ss_len = sizeof(*a4);
    return NULL;
}

/* Same rule as names in the config file (config.c check_name), which has no exported form. */
static bool is_name(const char *s, size_t len)
{
    if (len == 0 || len > 64)
        return false;
    for (size_t i = 0; i < len; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '-' || ch == '.'))
            return false;
    }
    return true;
}

struct walk {
    struct first_err fe;
    struct sl_endpoint_spec *specs; /* the valid endpoints, in file order */
    const struct sl_yaml_node **at; /* [i]: the address node of specs[i], for duplicates */
    size_t count;
    bool oom;
};

static bool set_address(struct walk *w, const struct sl_yaml_node *n, struct sl_endpoint_spec *sp)
{
    char q[160];
    if (!is_str(n)) {
        fail_node(&w->fe, n, "expected an address (ip:port), got %s", sl__config_yaml_kind_name(n));
        return false;
    }
    const char *why = memchr(n->str, '\0', n->len)
                          ? "must not contain NUL bytes"
                          : parse_ip_port(n->str, n->len, &sp->addr, &sp->addr_len);
    if (why) {
        fail_node(&w->fe, n, "invalid address %s: %s",
                  sl__config_quote(q, sizeof(q), n->str, n->len), why);
        return false;
    }
    return true;
}

static void set_weight(struct walk *w, const struct sl_yaml_node *n, struct sl_endpoint_spec *sp)
{
    char q[160];
    uint32_t v = 0;
    bool ok = is_str(n) && n->len > 0;
    for (size_t i = 0; ok && i < n->len; i++) {
        ok = n->str[i] >= '0' && n->str[i] <= '9';
        if (ok && v <= 1000) /* saturate: anything above is out of range anyway */
            v = v * 10 + (uint32_t)(n->str[i] - '0');
    }
    if (!ok || v < 1 || v > 1000) {
        fail_node(&w->fe, n, "weight must be an integer in 1..1000, got %s",
                  is_str(n) ? sl__config_quote(q, sizeof(q), n->str, n->len)
                            : sl__config_yaml_kind_name(n));
        return;
    }
    sp->weight = v;
}

static void set_zone(struct walk *w, const struct sl_yaml_node *n, struct sl_endpoint_spec *sp)
{
    char q[160];
    if (!is_str(n)) {
        fail_node(&w->fe, n, "zone must be a name, got %s", sl__config_yaml_kind_name(n));
        return;
    }
    if (!is_name(n->str, n->len)) {
        fail_node(&w->fe, n, "invalid zone %s: use 1 to 64 letters, digits, '_', '-' or '.'",
                  sl__config_quote(q, sizeof(q), n->str, n->len));
        return;
    }
    char *z = strndup(n->str, n->len);
    if (!z) {
        w->oom = true;
        return;
    }
    sp->zone = z;
}

/* One list element into w->specs[w->count]. An element whose address is valid is kept even
 * when another of its fields is not: the result is thrown away on any error, but the duplicate
 * check still needs every address, or an earlier duplicate would hide behind a later error. */
static void walk_item(struct walk *w, const struct sl_yaml_node *item)
{
    struct sl_endpoint_spec *sp = &w->specs[w->count];
    memset(sp, 0, sizeof(*sp));
    sp->weight = 1;
    const struct sl_yaml_node *addr = NULL;
    bool addr_ok = false;
    if (item->kind == SL_YAML_MAP) {
        const struct sl_yaml_node *weight = NULL, *zone = NULL;
        for (size_t i = 0; i < item->count; i++) {
            const struct sl_yaml_node *k = item->keys[i];
            if (key_is(k, "address")) {
                addr = item->items[i];
            } else if (key_is(k, "weight")) {
                weight = item->items[i];
            } else if (key_is(k, "zone")) {
                zone = item->items[i];
            } else {
                char q[160];
                fail_node(&w->fe, k,
                          "unknown key %s (expected \"address\", \"weight\" or \"zone\")",
                          sl__config_quote(q, sizeof(q), k->str, k->len));
            }
        }
        if (addr)
            addr_ok = set_address(w, addr, sp);
        else
            fail_node(&w->fe, item, "missing required key \"address\"");
        if (weight)
            set_weight(w, weight, sp);
        if (zone)
            set_zone(w, zone, sp);
    } else if (is_str(item)) {
        addr = item;
        addr_ok = set_address(w, addr, sp);
    } else {
        fail_node(&w->fe, item,
                  "expected an address (ip:port) or a mapping with \"address\", got %s",
                  sl__config_yaml_kind_name(item));
    }
    if (addr_ok) {
        sp->address = strndup(addr->str, addr->len);
        if (sp->address) {
            w->at[w->count++] = addr;
            return;
        }
        w->oom = true;
    }
    /* Not kept: the slot is reused by the next element. */
    free((char *)sp->zone);
    sp->zone = NULL;
}

struct dup_key {
    const struct sl_endpoint_spec *sp;
    size_t idx;
};

static int dup_cmp(const void *a, const void *b)
{
    const struct dup_key *x = a, *y = b;
    if (x->sp->addr_len != y->sp->addr_len)
        return x->sp->addr_len < y->sp->addr_len ? -1 : 1;
    /* Both were zeroed before being filled, so padding compares equal. */
    int c = memcmp(&x->sp->addr, &y->sp->addr, x->sp->addr_len);
    if (c)
        return c;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* Duplicates compared as socket addresses, so "[::1]:80" and "[0::1]:80" are one endpoint. */
static void check_duplicates(struct walk *w)
{
    if (w->count < 2)
        return;
    struct dup_key *keys = malloc(w->count * sizeof(*keys));
    if (!keys) {
        w->oom = true;
        return;
    }
    for (size_t i = 0; i < w->count; i++)
        keys[i] = (struct dup_key){&w->specs[i], i};
    qsort(keys, w->count, sizeof(*keys), dup_cmp);
    size_t first = 0; /* start of the current run of equal addresses: its lowest index */
    for (size_t i = 1; i < w->count; i++) {
        const struct sl_endpoint_spec *a = keys[first].sp, *b = keys[i].sp;
        if (a->addr_len != b->addr_len || memcmp(&a->addr, &b->addr, a->addr_len) != 0) {
            first = i;
            continue;
        }
        const struct sl_yaml_node *dup = w->at[keys[i].idx], *orig = w->at[keys[first].idx];
        char q[160];
        fail_node(&w->fe, dup, "duplicate address %s (first at %d:%d)",
                  sl__config_quote(q, sizeof(q), dup->str, dup->len), orig->line, orig->col);
    }
    free(keys);
}

static void walk_list(struct walk *w, const struct sl_yaml_node *seq)
{
    size_t n = seq->count < SL_EPFILE_MAX_ENDPOINTS ? seq->count : SL_EPFILE_MAX_ENDPOINTS;
    if (seq->count > SL_EPFILE_MAX_ENDPOINTS)
        fail_node(&w->fe, seq->items[SL_EPFILE_MAX_ENDPOINTS], "too many endpoints (at most %d)",
                  SL_EPFILE_MAX_ENDPOINTS);
    if (n == 0)
        return;
    w->specs = calloc(n, sizeof(*w->specs));
    w->at = calloc(n, sizeof(*w->at));
    if (!w->specs || !w->at) {
        w->oom = true;
        return;
    }
    for (size_t i = 0; i < n && !w->oom; i++)
        walk_item(w, seq->items[i]);
    if (!w->oom)
        check_duplicates(w);
}

static void walk_root(struct walk *w, const struct sl_yaml_node *root)
{
    if (root->kind == SL_YAML_SEQ) {
        walk_list(w, root);
        return;
    }
    if (root->kind != SL_YAML_MAP) {
        fail_node(&w->fe, root,
                  "expected a list of endpoints or a mapping with key \"endpoints\", got %s",
                  sl__config_yaml_kind_name(root));
        return;
    }
    const struct sl_yaml_node *list = NULL;
    for (size_t i = 0; i < root->count; i++) {
        const struct sl_yaml_node *k = root->keys[i];
        if (key_is(k, "endpoints")) {
            list = root->items[i];
        } else {
            char q[160];
            fail_node(&w->fe, k, "unknown key %s (the only key is \"endpoints\")",
                      sl__config_quote(q, sizeof(q), k->str, k->len));
        }
    }
    if (!list) {
        /* The tree reads an empty file as an empty mapping; say what to write instead. */
        fail_node(&w->fe, root,
                  "missing key \"endpoints\" (an empty file is refused; write `endpoints: []` "
                  "for no endpoints)");
        return;
    }
    if (list->kind != SL_YAML_SEQ) {
        fail_node(&w->fe, list, "expected a list of endpoints, got %s",
                  sl__config_yaml_kind_name(list));
        return;
    }
    walk_list(w, list);
}

void sl_epfile_specs_free(struct sl_endpoint_spec *specs, size_t n)
{
    if (!specs)
        return;
    for (size_t i = 0; i < n; i++) {
        /* The spec type is const for its readers; the strings are this array's own. */
        free((char *)specs[i].address);
        free((char *)specs[i].zone);
    }
    free(specs);
}

int sl_epfile_parse(const char *text, size_t len, struct sl_endpoint_spec **out, size_t *n,
                    char *err, size_t err_len)
{
    *out = NULL;
    *n = 0;
    if (len > SL_EPFILE_MAX_BYTES) {
        sl_fmt_err(err, err_len, "1:1: the file is larger than %u MiB", SL_EPFILE_MAX_BYTES >> 20);
        return -1;
    }
    struct sl_config_errors errs = {0};
    struct sl_yaml_node *root = NULL;
    struct walk w = {0};
    int rc = sl__config_yaml_parse(text, len, &errs, &root);
    for (size_t i = 0; i < errs.count; i++)
        fail_at(&w.fe, errs.items[i].line, errs.items[i].col, "%s", errs.items[i].message);
    if (rc == 0 && root)
        walk_root(&w, root);
    else if (!w.fe.set)
        w.oom = true; /* the tree failed without saying why: it could not record the error */
    sl__config_yaml_free(root);
    sl_config_errors_dispose(&errs);

    if (w.oom && !w.fe.set)
        fail_at(&w.fe, 1, 1, "out of memory");
    if (w.fe.set) {
        sl_fmt_err(err, err_len, "%d:%d: %s", w.fe.line, w.fe.col, w.fe.msg);
        /* Elements after the first error own no strings; the ones before do. */
        sl_epfile_specs_free(w.specs, w.count);
        free(w.at);
        return -1;
    }
    free(w.at);
    *out = w.specs;
    *n = w.count;
    return 0;
}

/* ---- reading ------------------------------------------------------------------------------ */

int sl_epfile_read(const char *path, struct sl_endpoint_spec **out, size_t *n, char *err,
                   size_t err_len)
{
    *out = NULL;
    *n = 0;
    char *buf = NULL;
    int rc = 0;
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        rc = -errno;
        if (rc == -ENOENT)
            sl_fmt_err(err, err_len, "%s: no such file", path);
        else
            sl_fmt_err(err, err_len, "%s: cannot open: %s", path, strerror(-rc));
        return rc;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        sl_fmt_err(err, err_len, "%s: cannot stat: %s", path, strerror(-rc));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = -EINVAL;
        sl_fmt_err(err, err_len, "%s: not a regular file", path);
        goto out;
    }
    if (st.st_size > (off_t)SL_EPFILE_MAX_BYTES) {
        rc = -EFBIG;
        goto too_big;
    }
    /* One byte more than the size seen, to notice a file that grew since the fstat; up to one
     * byte past the limit, to tell "exactly at the limit" from "over". */
    size_t cap = (size_t)st.st_size + 1, len = 0;
    buf = malloc(cap);
    if (!buf) {
        rc = -ENOMEM;
        sl_fmt_err(err, err_len, "%s: out of memory", path);
        goto out;
    }
    for (;;) {
        if (len == cap) {
            if (cap > SL_EPFILE_MAX_BYTES) {
                rc = -EFBIG;
                goto too_big;
            }
            size_t ncap = cap * 2 > SL_EPFILE_MAX_BYTES + 1 ? SL_EPFILE_MAX_BYTES + 1 : cap * 2;
            char *nb = realloc(buf, ncap);
            if (!nb) {
                rc = -ENOMEM;
                sl_fmt_err(err, err_len, "%s: out of memory", path);
                goto out;
            }
            buf = nb;
            cap = ncap;
        }
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            sl_fmt_err(err, err_len, "%s: cannot read: %s", path, strerror(-rc));
            goto out;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    char perr[512];
    if (sl_epfile_parse(buf, len, out, n, perr, sizeof(perr)) != 0) {
        rc = -EINVAL;
        sl_fmt_err(err, err_len, "%s:%s", path, perr);
    }
    goto out;
too_big:
    sl_fmt_err(err, err_len, "%s: larger than %u MiB", path, SL_EPFILE_MAX_BYTES >> 20);
out:
    free(buf);
    close(fd);
    return rc;
}

/* ---- watching ----------------------------------------------------------------------------- */

struct sl_epfile_watch {
    struct sl_loop *loop;
    struct sl_io io;
    struct sl_timer debounce;
    struct sl_defer free_defer;
    int fd;          /* inotify instance */
    char *dir;       /* the directory watched */
    char *name;      /* the file's name in it */
    size_t name_len; /* strlen(name) */
    sl_epfile_cb cb;
    void *data;
    uint64_t burst_start_ms; /* first event of the burst the timer is armed for */
    bool dir_gone;           /* warned once that the directory went away */
};

#define WATCH_MASK                                                                                 \
    (IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF |       \
     IN_MOVE_SELF | IN_ONLYDIR)

/* Room for at least one event with the longest name, and a few at once in the usual case. */
#define EVENT_BUF_BYTES 4096
_Static_assert(EVENT_BUF_BYTES >= sizeof(struct inotify_event) + NAME_MAX + 1,
               "inotify buffer must hold the largest event");

/* Reads per callback: the io is level-triggered, so what is left waits for the next turn
 * instead of holding the loop (a directory with a storm of unrelated files). */
#define MAX_READS_PER_CB 16

static void on_debounce(struct sl_timer *t)
{
    struct sl_epfile_watch *w = t->data;
    /* Last use of `w`: the callback may free the watch. */
    w->cb(w->data);
}

static void schedule(struct sl_epfile_watch *w)
{
    uint64_t now = sl_loop_now_ms(w->loop);
    if (!sl_timer_is_armed(&w->debounce))
        w->burst_start_ms = now;
    else if (now - w->burst_start_ms + SL_EPFILE_DEBOUNCE_MS > SL_EPFILE_DEBOUNCE_MAX_MS)
        return; /* pushing it back again would exceed the cap: keep the deadline */
    sl_timer_arm(w->loop, &w->debounce, SL_EPFILE_DEBOUNCE_MS);
}

static bool name_is(const char *name, size_t field_len, const char *want, size_t want_len)
{
    /* The kernel pads the name with NULs up to `len`. */
    return strnlen(name, field_len) == want_len && memcmp(name, want, want_len) == 0;
}

static bool event_matters(struct sl_epfile_watch *w, uint32_t mask, const char *name,
                          size_t name_len)
{
    if (mask & IN_Q_OVERFLOW)
        return true; /* events were lost: ours may have been among them */
    if (mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT)) {
        if (!w->dir_gone)
            SL_WARN("endpoints file %s/%s: the directory was removed or moved; further changes "
                    "are not seen",
                    w->dir, w->name);
        w->dir_gone = true;
        return true;
    }
    if (name_len == 0)
        return false;
    if (name_is(name, name_len, w->name, w->name_len))
        return true;
    /* Kubernetes volumes publish a new version by renaming a fresh `..data` symlink over the
     * old one; the file's own entry (a symlink through `..data`) never changes. */
    return (mask & (IN_MOVED_TO | IN_CREATE)) && name_is(name, name_len, "..data", 6);
}

static void on_inotify(struct sl_io *io, uint32_t events)
{
    (void)events;
    struct sl_epfile_watch *w = io->data;
    _Alignas(struct inotify_event) char buf[EVENT_BUF_BYTES];
    bool hit = false;
    for (int round = 0; round < MAX_READS_PER_CB; round++) {
        ssize_t r = read(w->fd, buf, sizeof(buf));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            break;
        if (r <= 0) {
            /* Not expected from inotify; stop listening rather than spin on a broken fd. */
            SL_ERR("endpoints file %s/%s: reading inotify events: %s; changes are no longer "
                   "seen",
                   w->dir, w->name, r < 0 ? strerror(errno) : "end of file");
            sl_io_stop(w->loop, &w->io);
            hit = true;
            break;
        }
        size_t off = 0;
        while ((size_t)r - off >= sizeof(struct inotify_event)) {
            struct inotify_event ev;
            memcpy(&ev, buf + off, sizeof(ev));
            size_t rec = sizeof(ev) + ev.len;
            if (rec > (size_t)r - off)
                break; /* the kernel never splits a record; be safe anyway */
            if (event_matters(w, ev.mask, buf + off + sizeof(ev), ev.len))
                hit = true;
            off += rec;
        }
    }
    if (hit)
        schedule(w);
}

static void on_free(struct sl_defer *d)
{
    struct sl_epfile_watch *w = d->data;
    free(w->dir);
    free(w->name);
    free(w);
}

struct sl_epfile_watch *sl_epfile_watch_new(struct sl_loop *loop, const char *path, sl_epfile_cb cb,
                                            void *data, char *err, size_t err_len)
{
    const char *slash = strrchr(path, '/');
    const char *name = slash ? slash + 1 : path;
    size_t name_len = strlen(name);
    if (name_len == 0 || strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
        sl_fmt_err(err, err_len, "%s: not a file path", path);
        return NULL;
    }
    if (name_len > NAME_MAX) {
        sl_fmt_err(err, err_len, "%s: file name too long", path);
        return NULL;
    }
    struct sl_epfile_watch *w = calloc(1, sizeof(*w));
    if (!w) {
        sl_fmt_err(err, err_len, "%s: out of memory", path);
        return NULL;
    }
    w->loop = loop;
    w->fd = -1;
    w->cb = cb;
    w->data = data;
    w->name = strdup(name);
    w->name_len = name_len;
    if (!slash)
        w->dir = strdup(".");
    else if (slash == path)
        w->dir = strdup("/");
    else
        w->dir = strndup(path, (size_t)(slash - path));
    if (!w->name || !w->dir) {
        sl_fmt_err(err, err_len, "%s: out of memory", path);
        goto fail;
    }
    w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->fd < 0) {
        int e = errno;
        sl_fmt_err(err, err_len, "%s: cannot watch: %s%s", path, strerror(e),
                   e == EMFILE ? " (inotify instances are limited by "
                                 "fs.inotify.max_user_instances)"
                               : "");
        goto fail;
    }
    if (inotify_add_watch(w->fd, w->dir, WATCH_MASK) < 0) {
        int e = errno;
        sl_fmt_err(err, err_len, "%s: cannot watch directory %s: %s%s", path, w->dir, strerror(e),
                   e == ENOSPC ? " (watches are limited by fs.inotify.max_user_watches)" : "");
        goto fail;
    }
    sl_timer_init(&w->debounce, on_debounce, w);
    sl_defer_init(&w->free_defer, on_free, w);
    int rc = sl_io_start(loop, &w->io, w->fd, EPOLLIN, on_inotify, w);
    if (rc < 0) {
        sl_fmt_err(err, err_len, "%s: cannot watch: %s", path, strerror(-rc));
        goto fail;
    }
    return w;
fail:
    if (w->fd >= 0)
        close(w->fd);
    free(w->dir);
    free(w->name);
    free(w);
    return NULL;
}

void sl_epfile_watch_free(struct sl_epfile_watch *w)
{
    if (!w)
        return;
    sl_timer_cancel(w->loop, &w->debounce);
    sl_io_stop(w->loop, &w->io);
    close(w->fd);
    w->fd = -1;
    sl_defer_queue(w->loop, &w->free_defer);
}
