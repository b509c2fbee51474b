/* Unit tests for the access-log writer: records made from fake requests are read back by
 * decompressing every segment with libzstd and parsing each line with jansson. Covered: the
 * fields and their JSON types, redaction, escaping and truncation, exact drop counts for a
 * full ring, concurrent producers against the log thread, rotation by size and by age,
 * segment names and temp-then-rename, a directory that disappears, a write error in the
 * middle of a segment (earlier batches kept), and leftover temporary segments. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#include "config/config.h"
#include "http/request.h"
#include "obs/access_log.h"

/* ---- helpers ------------------------------------------------------------------------------ */

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static char *make_dir(void)
{
    char *d = strdup("/tmp/sl-alog-test-XXXXXX");
    assert_non_null(d);
    assert_non_null(mkdtemp(d));
    return d;
}

static void remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                unlinkat(dirfd(d), e->d_name, 0);
        closedir(d);
    }
    rmdir(dir);
}

/* Each test gets a fresh directory as its state, removed after it even when it fails. */
static int dir_setup(void **state)
{
    *state = make_dir();
    return 0;
}

static int dir_teardown(void **state)
{
    remove_dir(*state);
    free(*state);
    return 0;
}

static struct sl_access_log_conf base_conf(char *dir)
{
    return (struct sl_access_log_conf){
        .directory = dir,
        .buffer_bytes = 1u << 20,
        .segment_max_bytes = 64u << 20,
        .segment_max_age_ms = 60000,
        .flush_interval_ms = 10,
    };
}

/* A request as the front-end and the exchange leave it at its end. */
struct fake {
    struct sl_request req;
    struct sl_h1_header hdrs[16];
    char rid[48];
    char path[64];
};

static struct sl_slice S(const char *s) {
    return sl_slice_cstr(s);
}

static void
fake_init(struct fake *f, unsigned i)
{
    memset(f, 0, sizeof *f);
    snprintf(f->rid, sizeof f->rid, "req-%08u", i);
    snprintf(f->path, sizeof f->path, "/items/%u", i * 7919u % 100003u);
    struct sl_request *r = &f->req;
    r->request_id = S(f->rid);
    r->client_ip = S("10.1.2.3");
    r->method = S("GET");
    r->host = S("api.example.com");
    r->path = S(f->path);
    r->query = S("token=querysecret");
    r->log.route = "items";
    r->log.upstream = "app";
    r->log.endpoint = "127.0.0.1:8080";
    r->log.status = 200;
    r->log.bytes_in = 120 + i;
    r->log.bytes_out = 4096;
    uint64_t now = mono_us();
    r->log.start_us = now - 5000;
    r->log.upstream_start_us = now - 4000;
    r->log.upstream_end_us = now - 1500; /* 2.5 ms */
    r->log.end_us = now - 1000;          /* 4 ms */
    r->log.cpu_ns = 12345;
}

/* The whole text of one zstd file; fails unless every frame in it is complete. */
static char *decode_file(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    char *comp = malloc((size_t)st.st_size + 1);
    assert_non_null(comp);
    assert_int_equal(read(fd, comp, (size_t)st.st_size), st.st_size);
    close(fd);
    size_t cap = 1 << 16, n = 0;
    char *text = malloc(cap + 1);
    assert_non_null(text);
    ZSTD_DStream *ds = ZSTD_createDStream();
    ZSTD_inBuffer in = {comp, (size_t)st.st_size, 0};
    size_t ret = 1;
    while (in.pos < in.size) {
        if (cap - n < 1 << 15) {
            cap *= 2;
            text = realloc(text, cap + 1);
            assert_non_null(text);
        }
        ZSTD_outBuffer out = {text + n, cap - n, 0};
        ret = ZSTD_decompressStream(ds, &out, &in);
        assert_false(ZSTD_isError(ret));
        n += out.pos;
    }
    assert_int_equal(ret, 0);
    ZSTD_freeDStream(ds);
    free(comp);
    text[n] = 0;
    *len = n;
    return text;
}

/* Every segment in `dir`, sorted by name, decompressed and parsed: a JSON array of the
 * records in order. Fails when a temporary file remains, a name does not have the final
 * form, a frame does not end, or a line is not JSON. `raw` (may be NULL) gets all the
 * decompressed text (caller frees), `nseg` the segment count. */
static int cmp_str(const void *x, const void *y)
{
    return strcmp(*(char *const *)x, *(char *const *)y);
}

static json_t *read_all_of(const char *dir, char **raw, size_t *nseg, int want_pid);

static json_t *read_all(const char *dir, char **raw, size_t *nseg)
{
    return read_all_of(dir, raw, nseg, (int)getpid());
}

/* read_all for segments whose writer was process `want_pid` (0: any) */
static json_t *read_all_of(const char *dir, char **raw, size_t *nseg, int want_pid)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    char *names[4096];
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        if (e->d_name[0] == '.') {
            print_error("temporary file left: %s\n", e->d_name);
            fail();
        }
        assert_true(n < 4096);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof names[0], cmp_str);

    json_t *all = json_array();
    size_t tlen = 0, tcap = 1 << 16;
    char *text = malloc(tcap);
    assert_non_null(text);
    for (size_t i = 0; i < n; i++) {
        /* sluice-YYYYMMDDTHHMMSS.mmmZ-<pid>-<instance>-<seq>.jsonl.zst */
        unsigned y, mo, dd, h, mi, s, ms;
        int pid;
        char inst[17] = "", tail[32] = "";
        assert_int_equal(sscanf(names[i], "sluice-%4u%2u%2uT%2u%2u%2u.%3uZ-%d-%16[0-9a-f]-%*u%31s",
                                &y, &mo, &dd, &h, &mi, &s, &ms, &pid, inst, tail),
                         10);
        assert_string_equal(tail, ".jsonl.zst");
        if (want_pid)
            assert_int_equal(pid, want_pid);
        assert_int_equal(strlen(inst), 16);

        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        size_t len;
        char *seg = decode_file(path, &len);
        assert_true(len > 0); /* no empty segment */
        while (tcap - tlen < len)
            tcap *= 2;
        text = realloc(text, tcap);
        assert_non_null(text);
        memcpy(text + tlen, seg, len);
        tlen += len;
        free(seg);
        free(names[i]);
    }
    char *p = text, *end = text + tlen;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        assert_non_null(nl);
        json_error_t jerr;
        json_t *rec = json_loadb(p, (size_t)(nl - p), 0, &jerr);
        if (!rec) {
            print_error("bad JSON (%s): %.*s\n", jerr.text, (int)(nl - p), p);
            fail();
        }
        json_array_append_new(all, rec);
        p = nl + 1;
    }
    if (raw) {
        text = realloc(text, tlen + 1);
        text[tlen] = 0;
        *raw = text;
    } else {
        free(text);
    }
    if (nseg)
        *nseg = n;
    return all;
}

static const char *jstr(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v)) {
        print_error("%s is not a string\n", key);
        fail();
    }
    return json_string_value(v);
}

/* Records 0 to n-1 of `all` are the fakes 0 to n-1, in that order. */
static void assert_ids_in_order(json_t *all, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char rid[32];
        snprintf(rid, sizeof rid, "req-%08zu", i);
        assert_string_equal(jstr(json_array_get(all, i), "request_id"), rid);
    }
}

static void record_n(struct sl_alog *a, unsigned worker, unsigned from, unsigned n)
{
    struct fake f;
    for (unsigned i = from; i < from + n; i++) {
        fake_init(&f, i);
        sl_alog_record(a, worker, &f.req);
    }
}

static struct sl_alog *new_alog(struct sl_access_log_conf *c, unsigned workers)
{
    char err[256] = "";
    struct sl_alog *a = sl_alog_new(c, workers, err, sizeof err);
    if (!a) {
        print_error("sl_alog_new: %s\n", err);
        fail();
    }
    return a;
}

static bool poll_until(bool (*cond)(struct sl_alog *), struct sl_alog *a, unsigned timeout_ms)
{
    uint64_t deadline = mono_us() + timeout_ms * 1000ull;
    while (!cond(a)) {
        if (mono_us() > deadline)
            return false;
        sleep_ms(2);
    }
    return true;
}

/* ---- fields ------------------------------------------------------------------------------- */

static void test_fields(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    char *headers[] = {"X-Trace", "User-Agent", "authorization", "X-Secret", "Cookie"};
    char *redact[] = {"x-secret"};
    c.headers = headers;
    c.header_count = 5;
    c.redact_headers = redact;
    c.redact_header_count = 1;
    struct sl_alog *a = new_alog(&c, 2);

    struct fake f;
    fake_init(&f, 1);
    f.hdrs[0] = (struct sl_h1_header){S("Authorization"), S("Bearer topsecret1")};
    f.hdrs[1] = (struct sl_h1_header){S("Cookie"), S("sid=topsecret2")};
    f.hdrs[2] = (struct sl_h1_header){S("X-Api-Key"), S("topsecret3")};
    f.hdrs[3] = (struct sl_h1_header){S("X-SECRET"), S("topsecret4")};
    f.hdrs[4] = (struct sl_h1_header){S("x-trace"), S("abc")};
    f.hdrs[5] = (struct sl_h1_header){S("User-Agent"), S("curl/8")};
    f.hdrs[6] = (struct sl_h1_header){S("X-Trace"), S("def")};
    f.hdrs[7] = (struct sl_h1_header){S("Proxy-Authorization"), S("Basic topsecret5")};
    f.req.headers = f.hdrs;
    f.req.header_count = 8;
    sl_alog_record(a, 0, &f.req);

    /* a gateway answer: no upstream, a filter's error, TLS, a consumer, an abort */
    fake_init(&f, 2);
    f.req.method = S("POST");
    f.req.consumer = S("mobile-app");
    f.req.secure = true;
    f.req.log.route = NULL;
    f.req.log.upstream = NULL;
    f.req.log.endpoint = NULL;
    f.req.log.upstream_start_us = f.req.log.upstream_end_us = 0;
    f.req.log.error = "rate_limited";
    f.req.log.filter = "rate_limit";
    f.req.log.status = 429;
    f.req.log.retries = 2;
    f.req.log.aborted = true;
    sl_alog_record(a, 1, &f.req);

    sl_alog_stop(a);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    assert_int_equal(st.records_written, 2);
    assert_int_equal(st.segments_closed, 1);
    assert_int_equal(st.records_dropped_full + st.records_dropped_io, 0);
    assert_true(st.bytes_compressed > 0 && st.bytes_uncompressed > 0);

    char *raw;
    json_t *all = read_all(dir, &raw, NULL);
    assert_int_equal(json_array_size(all), 2);
    for (int k = 1; k <= 5; k++) { /* never recorded, whatever the config says */
        char secret[32];
        snprintf(secret, sizeof secret, "topsecret%d", k);
        assert_null(strstr(raw, secret));
    }
    assert_null(strstr(raw, "querysecret"));
    assert_null(strstr(raw, "token="));

    json_t *r = json_array_get(all, 0);
    const char *t = jstr(r, "time"); /* 2024-05-01T12:34:56.789Z, about 5 ms ago */
    assert_int_equal(strlen(t), 24);
    assert_true(t[4] == '-' && t[10] == 'T' && t[19] == '.' && t[23] == 'Z');
    struct tm tm = {0};
    assert_non_null(strptime(t, "%Y-%m-%dT%H:%M:%S", &tm));
    long long age = (long long)time(NULL) - (long long)timegm(&tm);
    assert_true(age >= -1 && age <= 5);
    assert_string_equal(jstr(r, "request_id"), "req-00000001");
    assert_string_equal(jstr(r, "client"), "10.1.2.3");
    assert_string_equal(jstr(r, "method"), "GET");
    assert_string_equal(jstr(r, "host"), "api.example.com");
    assert_string_equal(jstr(r, "path"), "/items/7919");
    assert_int_equal(json_integer_value(json_object_get(r, "status")), 200);
    assert_int_equal(json_integer_value(json_object_get(r, "bytes_in")), 121);
    assert_int_equal(json_integer_value(json_object_get(r, "bytes_out")), 4096);
    assert_string_equal(jstr(r, "route"), "items");
    assert_true(json_is_null(json_object_get(r, "consumer")));
    assert_string_equal(jstr(r, "upstream"), "app");
    assert_string_equal(jstr(r, "endpoint"), "127.0.0.1:8080");
    assert_true(json_real_value(json_object_get(r, "upstream_ms")) == 2.5);
    assert_true(json_real_value(json_object_get(r, "total_ms")) == 4.0);
    assert_int_equal(json_integer_value(json_object_get(r, "retries")), 0);
    assert_true(json_is_null(json_object_get(r, "error")));
    assert_null(json_object_get(r, "filter"));
    assert_true(json_real_value(json_object_get(r, "cpu_us")) == 12.345);
    assert_true(json_is_false(json_object_get(r, "tls")));
    assert_null(json_object_get(r, "client_subject"));
    assert_null(json_object_get(r, "aborted"));
    assert_null(json_object_get(r, "truncated"));
    json_t *h = json_object_get(r, "headers");
    assert_true(json_is_object(h));
    assert_int_equal(json_object_size(h), 2);
    assert_string_equal(jstr(h, "x-trace"), "abc, def");
    assert_string_equal(jstr(h, "user-agent"), "curl/8");

    r = json_array_get(all, 1);
    assert_string_equal(jstr(r, "method"), "POST");
    assert_string_equal(jstr(r, "consumer"), "mobile-app");
    assert_true(json_is_null(json_object_get(r, "route")));
    assert_true(json_is_null(json_object_get(r, "upstream")));
    assert_true(json_is_null(json_object_get(r, "endpoint")));
    assert_true(json_is_null(json_object_get(r, "upstream_ms")));
    assert_string_equal(jstr(r, "error"), "rate_limited");
    assert_string_equal(jstr(r, "filter"), "rate_limit");
    assert_int_equal(json_integer_value(json_object_get(r, "status")), 429);
    assert_int_equal(json_integer_value(json_object_get(r, "retries")), 2);
    assert_true(json_is_true(json_object_get(r, "tls")));
    assert_true(json_is_true(json_object_get(r, "aborted")));
    assert_int_equal(json_object_size(json_object_get(r, "headers")), 0);

    json_decref(all);
    free(raw);
    sl_alog_free(a);
}

/* Without configured headers there is no "headers" key at all. */
static void test_no_headers_key(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *a = new_alog(&c, 1);
    struct fake f;
    fake_init(&f, 1);
    f.hdrs[0] = (struct sl_h1_header){S("X-Trace"), S("abc")};
    f.req.headers = f.hdrs;
    f.req.header_count = 1;
    sl_alog_record(a, 0, &f.req);
    sl_alog_free(a);
    json_t *all = read_all(dir, NULL, NULL);
    assert_int_equal(json_array_size(all), 1);
    assert_null(json_object_get(json_array_get(all, 0), "headers"));
    json_decref(all);
}

static void test_escaping(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    char *headers[] = {"X-Odd"};
    c.headers = headers;
    c.header_count = 1;
    struct sl_alog *a = new_alog(&c, 1);

    /* quote, backslash, controls, DEL, valid UTF-8 (2 and 4 bytes), then invalid: a stray
     * 0xff, an overlong '/', a surrogate, a sequence cut by the end */
    static const char path[] = "/a\"b\\c\x01\n\t\x7f"
                               "\xc3\xa9\xf0\x9f\x98\x80"
                               "\xffx\xc0\xaf\xed\xa0\x80\xc3";
    /* what a JSON parser makes of it: each invalid byte became the code point of its value */
    static const char expect[] = "/a\"b\\c\x01\n\t\x7f"
                                 "\xc3\xa9\xf0\x9f\x98\x80"
                                 "\xc3\xbfx\xc3\x80\xc2\xaf\xc3\xad\xc2\xa0\xc2\x80\xc3\x83";
    struct fake f;
    fake_init(&f, 1);
    f.req.path = sl_slice_make(path, sizeof path - 1);
    f.req.host = S("h\"ost\r");
    f.hdrs[0] = (struct sl_h1_header){S("x-odd"), S("v\\al\"ue\x1f")};
    f.req.headers = f.hdrs;
    f.req.header_count = 1;
    sl_alog_record(a, 0, &f.req);
    sl_alog_free(a);

    char *raw;
    json_t *all = read_all(dir, &raw, NULL);
    json_t *r = json_array_get(all, 0);
    assert_string_equal(jstr(r, "path"), expect);
    assert_string_equal(jstr(r, "host"), "h\"ost\r");
    assert_string_equal(jstr(json_object_get(r, "headers"), "x-odd"), "v\\al\"ue\x1f");
    /* the escapes themselves, as written */
    assert_non_null(strstr(raw, "\"/a\\\"b\\\\c\\u0001\\n\\t\\u007f\xc3\xa9"));
    assert_non_null(strstr(raw, "\\u00ffx\\u00c0\\u00af\\u00ed\\u00a0\\u0080\\u00c3\""));
    json_decref(all);
    free(raw);
}

/*
 * Random strings built from tokens (plain ASCII, specials, controls, valid 2/3/4-byte UTF-8,
 * bytes that are never valid UTF-8, a cut sequence, a stray continuation byte), 8-byte runs
 * included, at every alignment: the JSON parser gives back the expected string each time
 * (valid UTF-8 kept, every invalid byte as the code point of its value).
 */
struct token {
    const char *in, *out;
};

static void test_escaping_random(void **state)
{
    static const struct token tokens[] = {
        {"a", "a"},
        {"abcdefgh", "abcdefgh"},
        {"/0123456789ABCDEF", "/0123456789ABCDEF"},
        {"\"", "\""},
        {"\\", "\\"},
        {"\x01", "\x01"},
        {"\x1f", "\x1f"},
        {"\n\r\t", "\n\r\t"},
        {"\x7f", "\x7f"},
        {" ~", " ~"},
        {"\xc3\xa9", "\xc3\xa9"},
        {"\xe2\x82\xac", "\xe2\x82\xac"},
        {"\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80"},
        {"\xff", "\xc3\xbf"},
        {"\xfe", "\xc3\xbe"},
        {"\xc0", "\xc3\x80"},
        {"\xc1", "\xc3\x81"},
        {"\xf5", "\xc3\xb5"},
        {"\xe2\x82"
         "A",
         "\xc3\xa2\xc2\x82"
         "A"},
        {"A\x80", "A\xc2\x80"},
        {"\xed\xa0\x80", "\xc3\xad\xc2\xa0\xc2\x80"},
    };
    enum { N = 1500, NT = sizeof tokens / sizeof tokens[0] };
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    c.buffer_bytes = 16u << 20;
    struct sl_alog *a = new_alog(&c, 1);
    char(*want)[512] = malloc(N * sizeof *want);
    assert_non_null(want);
    srand(12345);
    for (unsigned i = 0; i < N; i++) {
        char in[512];
        size_t il = 0, ol = 0;
        unsigned k = (unsigned)rand() % 24;
        for (unsigned t = 0; t < k; t++) {
            const struct token *tk = &tokens[(unsigned)rand() % NT];
            size_t a1 = strlen(tk->in), a2 = strlen(tk->out);
            memcpy(in + il, tk->in, a1);
            memcpy(want[i] + ol, tk->out, a2);
            il += a1;
            ol += a2;
        }
        want[i][ol] = 0;
        struct fake f;
        fake_init(&f, i);
        f.req.path = sl_slice_make(in, il);
        sl_alog_record(a, 0, &f.req);
    }
    sl_alog_free(a);
    json_t *all = read_all(dir, NULL, NULL);
    assert_int_equal(json_array_size(all), N);
    for (unsigned i = 0; i < N; i++)
        assert_string_equal(jstr(json_array_get(all, i), "path"), want[i]);
    json_decref(all);
    free(want);
}

static void test_truncation(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *a = new_alog(&c, 1);
    char *longp = malloc(5000);
    assert_non_null(longp);
    memset(longp, 'p', 5000);
    struct fake f;
    fake_init(&f, 1);
    f.req.path = sl_slice_make(longp, 5000);
    sl_alog_record(a, 0, &f.req);
    fake_init(&f, 2);
    sl_alog_record(a, 0, &f.req);
    sl_alog_free(a);
    json_t *all = read_all(dir, NULL, NULL);
    assert_int_equal(json_array_size(all), 2);
    json_t *r = json_array_get(all, 0);
    assert_int_equal(strlen(jstr(r, "path")), 2048);
    assert_true(json_is_true(json_object_get(r, "truncated")));
    assert_null(json_object_get(json_array_get(all, 1), "truncated"));
    json_decref(all);
    free(longp);
}

/* ---- ring ------------------------------------------------------------------------------- */

/* No consumer runs: a 4 KiB ring takes what fits, every other record is counted. */
static void test_ring_full_counted(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    c.buffer_bytes = 4096;
    struct sl_alog *a = new_alog(&c, 2);
    record_n(a, 0, 0, 300);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    uint64_t dropped = st.records_dropped_full;
    assert_true(dropped > 0 && dropped < 300);
    assert_int_equal(st.records_written, 0);
    sl_alog_stop(a);
    sl_alog_get_stats(a, &st);
    assert_int_equal(st.records_dropped_full, dropped);
    assert_int_equal(st.records_dropped_io, 0);
    json_t *all = read_all(dir, NULL, NULL);
    assert_int_equal(json_array_size(all), 300 - dropped);
    assert_int_equal(st.records_written, 300 - dropped);
    /* the first ones are kept, in order */
    assert_ids_in_order(all, json_array_size(all));
    json_decref(all);
    sl_alog_free(a);
}

struct producer {
    struct sl_alog *a;
    unsigned worker, n;
};

static void *produce(void *arg)
{
    struct producer *p = arg;
    struct fake f;
    for (unsigned i = 0; i < p->n; i++) {
        fake_init(&f, p->worker * 1000000u + i);
        sl_alog_record(p->a, p->worker, &f.req);
        if (i % 64 == 0)
            sched_yield();
    }
    return NULL;
}

/* Two workers record while the log thread drains: every record is either written, in its
 * worker's order, or counted as dropped. */
static void test_concurrent_producers(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    c.buffer_bytes = 64 * 1024;
    c.flush_interval_ms = 1;
    struct sl_alog *a = new_alog(&c, 2);
    assert_int_equal(sl_alog_start(a), 0);
    enum { N = 20000 };
    struct producer p[2] = {{a, 0, N}, {a, 1, N}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, produce, &p[i]), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    sl_alog_stop(a);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    json_t *all = read_all(dir, NULL, NULL);
    assert_int_equal(json_array_size(all), st.records_written);
    assert_int_equal(st.records_written + st.records_dropped_full, 2 * N);
    assert_int_equal(st.records_dropped_io, 0);
    long last[2] = {-1, -1};
    for (size_t i = 0; i < json_array_size(all); i++) {
        unsigned id = (unsigned)strtoul(jstr(json_array_get(all, i), "request_id") + 4, NULL, 10);
        unsigned w = id / 1000000u;
        assert_true(w < 2);
        assert_true((long)(id % 1000000u) > last[w]);
        last[w] = id % 1000000u;
    }
    json_decref(all);
    sl_alog_free(a);
}

static bool drained_more(struct sl_alog *a)
{
    static uint64_t last;
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    if (st.bytes_uncompressed == last)
        return false;
    last = st.bytes_uncompressed;
    return true;
}

/* One record at a time through a 4 KiB ring, each drained before the next: the positions
 * go round the ring many times and records straddle its end; none is lost or garbled. */
static void test_ring_wraps(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    c.buffer_bytes = 4096;
    c.flush_interval_ms = 1;
    struct sl_alog *a = new_alog(&c, 1);
    assert_int_equal(sl_alog_start(a), 0);
    drained_more(a);
    enum { N = 200 };
    struct fake f;
    for (unsigned i = 0; i < N; i++) {
        fake_init(&f, i);
        f.req.consumer = sl_slice_make("abcdefghijklmnopqrstuvwxyz", i % 27); /* sizes vary */
        sl_alog_record(a, 0, &f.req);
        assert_true(poll_until(drained_more, a, 2000));
    }
    sl_alog_stop(a);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    assert_int_equal(st.records_written, N);
    assert_int_equal(st.records_dropped_full, 0);
    json_t *all = read_all(dir, NULL, NULL);
    assert_int_equal(json_array_size(all), N);
    assert_ids_in_order(all, N);
    for (size_t i = 0; i < N; i++) {
        json_t *r = json_array_get(all, i);
        json_t *cons = json_object_get(r, "consumer");
        if (i % 27 == 0)
            assert_true(json_is_null(cons));
        else
            assert_int_equal(strlen(json_string_value(cons)), i % 27);
        assert_string_equal(jstr(r, "host"), "api.example.com");
    }
    json_decref(all);
    sl_alog_free(a);
}

/* ---- segments ----------------------------------------------------------------------------- */

static unsigned hook_calls;
static char hook_last[512];

static void on_segment(const char *path, void *data)
{
    (void)data;
    struct stat st;
    assert_int_equal(stat(path, &st), 0); /* already under its final name */
    assert_true(strcmp(path, hook_last) > 0);
    snprintf(hook_last, sizeof hook_last, "%s", path);
    hook_calls++;
}

/* As on_segment, for recovered segments: they come in directory order, not name order. */
static void on_segment_any_order(const char *path, void *data)
{
    (void)data;
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    hook_calls++;
}

static void test_rotation_by_size(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    c.buffer_bytes = 8u << 20;
    c.segment_max_bytes = 4096;
    struct sl_alog *a = new_alog(&c, 1);
    hook_calls = 0;
    hook_last[0] = 0;
    sl_alog_on_segment(a, on_segment, NULL);
    enum { N = 6000 };
    record_n(a, 0, 0, N);
    sl_alog_stop(a);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    assert_true(st.segments_closed >= 3);
    assert_int_equal(hook_calls, st.segments_closed);
    assert_int_equal(st.records_written, N);

    size_t nseg;
    json_t *all = read_all(dir, NULL, &nseg);
    assert_int_equal(nseg, st.segments_closed);
    assert_int_equal(json_array_size(all), N);
    /* sorted by name, the segments hold the records in the order they were made */
    assert_ids_in_order(all, N);
    /* each closed for its size: all but the last reached max_bytes */
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    size_t small = 0;
    while ((e = readdir(d)) != NULL) {
        struct stat fs;
        if (e->d_name[0] == '.')
            continue;
        assert_int_equal(fstatat(dirfd(d), e->d_name, &fs, 0), 0);
        if (fs.st_size < 4096)
            small++;
    }
    closedir(d);
    assert_true(small <= 1);
    json_decref(all);
    sl_alog_free(a);
}

static bool one_closed(struct sl_alog *a)
{
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    return st.segments_closed >= 1;
}

static void test_rotation_by_age(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    c.segment_max_age_ms = 100;
    struct sl_alog *a = new_alog(&c, 1);
    assert_int_equal(sl_alog_start(a), 0);
    record_n(a, 0, 0, 10);
    uint64_t t0 = mono_us();
    assert_true(poll_until(one_closed, a, 3000)); /* closed by age while running */
    assert_true(mono_us() - t0 >= 90 * 1000);
    record_n(a, 0, 10, 10);
    sl_alog_stop(a);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    assert_int_equal(st.segments_closed, 2);
    size_t nseg;
    json_t *all = read_all(dir, NULL, &nseg);
    assert_int_equal(nseg, 2);
    assert_int_equal(json_array_size(all), 20);
    json_decref(all);
    sl_alog_free(a);
}

/* An idle writer leaves no file behind; stop is idempotent. */
static void test_idle_no_segment(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *a = new_alog(&c, 1);
    assert_int_equal(sl_alog_start(a), 0);
    sleep_ms(30);                 /* a few empty cycles */
    assert_true(sl_alog_stop(a)); /* the thread finished */
    assert_true(sl_alog_stop(a));
    assert_true(sl_alog_stop(NULL));
    size_t nseg;
    json_t *all = read_all(dir, NULL, &nseg);
    assert_int_equal(nseg, 0);
    json_decref(all);
    sl_alog_record(NULL, 0, NULL);
    sl_alog_free(a);
}

/* A log thread stuck in its last segment (the hook stands in for a stuck disk) is abandoned
 * after 5 s: stop says so, every later stop too, and the abandoned thread may still call the
 * hook afterwards, which is why the caller must keep what the hook uses. The writer is kept
 * reachable (its memory is left to the process exit by design). */
static atomic_bool stuck_release, stuck_entered, stuck_returned;
static struct sl_alog *stuck_alog;

static void on_segment_stuck(const char *path, void *data)
{
    (void)path;
    (void)data;
    atomic_store(&stuck_entered, true);
    uint64_t deadline = mono_us() + 30u * 1000 * 1000;
    while (!atomic_load(&stuck_release) && mono_us() < deadline)
        sleep_ms(5);
    atomic_store(&stuck_returned, true);
}

static void test_stop_reports_abandoned_thread(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    stuck_alog = new_alog(&c, 1);
    sl_alog_on_segment(stuck_alog, on_segment_stuck, NULL);
    record_n(stuck_alog, 0, 0, 5);
    assert_int_equal(sl_alog_start(stuck_alog), 0);
    uint64_t t0 = mono_us();
    assert_false(sl_alog_stop(stuck_alog)); /* the hook of the final close never returned */
    assert_true(mono_us() - t0 >= 4u * 1000 * 1000);
    assert_true(atomic_load(&stuck_entered));
    assert_false(sl_alog_stop(stuck_alog));
    sl_alog_free(stuck_alog); /* leaves it: the thread still runs */
    atomic_store(&stuck_release, true);
    uint64_t deadline = mono_us() + 10u * 1000 * 1000;
    while (!atomic_load(&stuck_returned) && mono_us() < deadline)
        sleep_ms(2);
    assert_true(atomic_load(&stuck_returned));
}

/* The directory goes away while running (a path that is now a file): every record is
 * counted as dropped_io, nothing crashes, the process keeps going. */
static void test_directory_unwritable(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *a = new_alog(&c, 1);
    assert_int_equal(sl_alog_start(a), 0);
    assert_int_equal(rmdir(dir), 0);
    int fd = open(dir, O_WRONLY | O_CREAT | O_EXCL, 0600);
    assert_true(fd >= 0);
    close(fd);
    record_n(a, 0, 0, 50);
    sleep_ms(30);
    record_n(a, 0, 50, 50);
    sl_alog_stop(a);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    assert_int_equal(st.records_dropped_io, 100);
    assert_int_equal(st.records_written, 0);
    assert_int_equal(st.segments_closed, 0);
    sl_alog_free(a);
    unlink(dir);

    /* at start-up, a path that cannot be a directory is refused with a message */
    char err[256] = "";
    c.directory = "/proc/version/logs";
    assert_null(sl_alog_new(&c, 1, err, sizeof err));
    assert_non_null(strstr(err, "access_log.directory"));
}

static bool io_dropped(struct sl_alog *a)
{
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    return st.records_dropped_io > 0;
}

static bool some_written(struct sl_alog *a)
{
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    return st.bytes_compressed > 0;
}

/* A write fails in the middle of a segment (the file-size limit stands in for a full disk):
 * that batch is dropped and counted, the batches already in the segment are kept in a
 * complete frame, and writing resumes with a new segment. */
static void test_write_error_keeps_earlier_batches(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    c.flush_interval_ms = 5;
    struct sl_alog *a = new_alog(&c, 1);
    record_n(a, 0, 0, 100); /* all in the first batch */
    assert_int_equal(sl_alog_start(a), 0);
    assert_true(poll_until(some_written, a, 3000));
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);

    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    lim = old;
    lim.rlim_cur = st.bytes_compressed + 16;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    record_n(a, 0, 100, 3000);
    bool failed = poll_until(io_dropped, a, 3000);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, old_handler);
    assert_true(failed);

    record_n(a, 0, 10000, 10); /* after the disk "recovered" */
    sl_alog_stop(a);
    sl_alog_get_stats(a, &st);
    assert_true(st.records_dropped_io > 0);
    assert_int_equal(st.records_written + st.records_dropped_io, 3110);
    size_t nseg;
    json_t *all = read_all(dir, NULL, &nseg);
    assert_int_equal(json_array_size(all), st.records_written);
    assert_true(nseg >= 2);
    /* the first 100 survived the failure, and the last 10 were written after it */
    assert_ids_in_order(all, 100);
    assert_string_equal(jstr(json_array_get(all, json_array_size(all) - 1), "request_id"),
                        "req-00010009");
    json_decref(all);
    sl_alog_free(a);
}

static size_t count_lines(const char *path)
{
    size_t len, lines = 0;
    char *text = decode_file(path, &len);
    for (size_t i = 0; i < len; i++)
        lines += text[i] == '\n';
    free(text);
    return lines;
}

static void copy_file(const char *from, const char *to, size_t cut, const void *extra,
                      size_t extra_len)
{
    size_t len;
    int fd = open(from, O_RDONLY);
    assert_true(fd >= 0);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    char *buf = malloc((size_t)st.st_size + extra_len);
    assert_non_null(buf);
    assert_int_equal(read(fd, buf, (size_t)st.st_size), st.st_size);
    close(fd);
    len = (size_t)st.st_size - cut;
    if (extra_len)
        memcpy(buf + len, extra, extra_len);
    fd = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, len + extra_len), (ssize_t)(len + extra_len));
    close(fd);
    free(buf);
}

/* The path of the one entry of `dir` whose name contains `part`, or fails. */
static void find_one(const char *dir, const char *part, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    int found = 0;
    while ((e = readdir(d)) != NULL) {
        if (strstr(e->d_name, part)) {
            snprintf(out, cap, "%s/%s", dir, e->d_name);
            found++;
        }
    }
    closedir(d);
    assert_int_equal(found, 1);
}

/*
 * An open segment is a complete zstd frame after every batch, so a writer that dies leaves a
 * readable file. At the next start, temporary segments nobody holds a lock on are finished
 * and renamed (cut after their last whole block when the writer died inside a batch) and
 * handed to the hook, whatever the pid in their name (ours: a previous life; one that looks
 * dead); one with no whole block is removed; a locked one is left alone, whatever its pid
 * (ours: another container's pid 1; one that looks dead: another pid namespace); one that does
 * not start as ours do (another magic number, a frame declaring its size) is left as it is.
 */

/* Opens `path` and takes the lock a live writer holds; the caller closes the fd to let go. */
static int hold_lock(const char *path)
{
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    assert_int_equal(fcntl(fd, F_OFD_SETLK, &fl), 0);
    return fd;
}
static bool three_hooked(struct sl_alog *a)
{
    (void)a;
    return hook_calls >= 3;
}

static void test_leftovers_recovered(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *a = new_alog(&c, 1);
    record_n(a, 0, 0, 30);
    assert_int_equal(sl_alog_start(a), 0);
    assert_true(poll_until(some_written, a, 3000));
    char live[512];
    find_one(dir, ".sluice-", live, sizeof live);
    assert_int_equal(count_lines(live), 30); /* readable while still open */

    char dead1[512], dead2[512], junk[512], empty[512], sized[512], own[512];
    char live_own_pid[512], live_dead_pid[512];
    /* the name a version without instance ids gave */
    snprintf(dead1, sizeof dead1, "%s/.sluice-2147483000-000001.jsonl.zst.tmp", dir);
    snprintf(dead2, sizeof dead2, "%s/.sluice-2147483001-00000000deadbeef-000002.jsonl.zst.tmp",
             dir);
    snprintf(junk, sizeof junk, "%s/.sluice-2147483002-000001.jsonl.zst.tmp", dir);
    snprintf(empty, sizeof empty, "%s/.sluice-%d-000009.jsonl.zst.tmp", dir, (int)getpid());
    snprintf(sized, sizeof sized, "%s/.sluice-2147483003-000001.jsonl.zst.tmp", dir);
    snprintf(own, sizeof own, "%s/.sluice-%d-0123456789abcdef-000003.jsonl.zst.tmp", dir,
             (int)getpid());
    snprintf(live_own_pid, sizeof live_own_pid,
             "%s/.sluice-%d-fedcba9876543210-000001.jsonl.zst.tmp", dir, (int)getpid());
    snprintf(live_dead_pid, sizeof live_dead_pid,
             "%s/.sluice-2147483004-fedcba9876543211-000001.jsonl.zst.tmp", dir);
    static const char line[] = "{\"a\":1}\n";
    unsigned char frame[256];
    size_t flen = ZSTD_compress(frame, sizeof frame, line, sizeof line - 1, 1);
    assert_false(ZSTD_isError(flen)); /* one-shot: the header declares the content size */
    int sfd = open(sized, O_WRONLY | O_CREAT, 0600);
    assert_true(sfd >= 0);
    assert_int_equal(write(sfd, frame, flen), (ssize_t)flen);
    close(sfd);
    copy_file(live, dead1, 0, NULL, 0); /* died between batches */
    /* died inside a batch: the end block overwritten by the start of a 1000-byte block */
    static const unsigned char partial[] = {0x44, 0x1f, 0x00, 'x', 'y', 'z'};
    copy_file(live, dead2, 3, partial, sizeof partial);
    copy_file(live, junk, 0, NULL, 0);
    int fd = open(junk, O_WRONLY);
    assert_int_equal(pwrite(fd, "garbage!", 8, 0), 8);
    close(fd);
    fd = open(empty, O_WRONLY | O_CREAT, 0600);
    assert_true(fd >= 0);
    close(fd);
    copy_file(live, own, 0, NULL, 0); /* our pid, unlocked: a previous life */
    copy_file(live, live_own_pid, 0, NULL, 0);
    copy_file(live, live_dead_pid, 0, NULL, 0);
    int held1 = hold_lock(live_own_pid), held2 = hold_lock(live_dead_pid);
    sl_alog_free(a);

    hook_calls = 0;
    hook_last[0] = 0;
    a = new_alog(&c, 1);
    sl_alog_on_segment(a, on_segment_any_order, NULL);
    assert_int_equal(sl_alog_start(a), 0);
    assert_true(poll_until(three_hooked, a, 3000));
    sl_alog_free(a);
    assert_int_equal(hook_calls, 3);

    const char *gone[] = {dead1, dead2, empty, own};
    for (int i = 0; i < 4; i++)
        assert_int_equal(access(gone[i], F_OK), -1);
    /* locked: a live writer's, whatever the pid says; untouched */
    assert_int_equal(count_lines(live_own_pid), 30);
    assert_int_equal(count_lines(live_dead_pid), 30);
    close(held1);
    close(held2);
    /* not ours to cut or remove: left as they were */
    struct stat js;
    assert_int_equal(stat(junk, &js), 0);
    assert_int_equal(stat(sized, &js), 0);
    assert_int_equal(js.st_size, (off_t)flen);
    assert_int_equal(count_lines(sized), 1);
    char path[512];
    find_one(dir, "-2147483000-0000000000000000-000001.jsonl.zst", path, sizeof path);
    assert_int_equal(strstr(path, "/sluice-") != NULL, 1); /* a final name */
    assert_int_equal(count_lines(path), 30);
    find_one(dir, "-2147483001-00000000deadbeef-000002.jsonl.zst", path, sizeof path);
    assert_int_equal(strstr(path, "/sluice-") != NULL, 1);
    assert_int_equal(count_lines(path), 30); /* the whole batches before the cut */
    find_one(dir, "-0123456789abcdef-000003.jsonl.zst", path, sizeof path);
    assert_int_equal(strstr(path, "/sluice-") != NULL, 1);
    assert_int_equal(count_lines(path), 30);
}

/*
 * Two writers share a directory with the same pid (two containers' pid 1; here, two writers
 * in one process): the second one's start-up recovery leaves the first one's open segment
 * alone, their names never collide, and every record of both ends up written exactly once.
 */
static void test_two_writers_share_directory(void **state)
{
    char *dir = *state;
    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *first = new_alog(&c, 1);
    record_n(first, 0, 0, 50);
    assert_int_equal(sl_alog_start(first), 0);
    assert_true(poll_until(some_written, first, 3000)); /* its segment is open */

    struct sl_alog *second = new_alog(&c, 1);
    record_n(second, 0, 1000, 50);
    assert_int_equal(sl_alog_start(second), 0);
    assert_true(poll_until(some_written, second, 3000)); /* past its recovery */
    record_n(first, 0, 50, 50);
    record_n(second, 0, 1050, 50);
    assert_true(sl_alog_stop(first));
    assert_true(sl_alog_stop(second));

    struct sl_alog_stats st1, st2;
    sl_alog_get_stats(first, &st1);
    sl_alog_get_stats(second, &st2);
    assert_int_equal(st1.records_written, 100);
    assert_int_equal(st1.segments_failed, 0);
    assert_int_equal(st1.records_dropped_io, 0);
    assert_int_equal(st2.records_written, 100);
    assert_int_equal(st2.segments_failed, 0);
    size_t nseg;
    json_t *all = read_all(dir, NULL, &nseg);
    assert_int_equal(nseg, 2);
    assert_int_equal(json_array_size(all), 200);
    static bool seen[1100];
    memset(seen, 0, sizeof seen);
    for (size_t i = 0; i < 200; i++) {
        unsigned id;
        assert_int_equal(sscanf(jstr(json_array_get(all, i), "request_id"), "req-%u", &id), 1);
        assert_true(id < 100 || (id >= 1000 && id < 1100));
        assert_false(seen[id]);
        seen[id] = true;
    }
    json_decref(all);
    sl_alog_free(first);
    sl_alog_free(second);
}

/* Makes renameat2 fail with `err` in the calling thread and the threads it starts from now
 * on (for a child process: it cannot be undone). 0 or -1. */
static int deny_renameat2(int err)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_renameat2, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((unsigned)err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

/* The child of test_rename_without_noreplace: writes 10 records with renameat2 failing. */
static int rename_child(char *dir, int err)
{
    if (deny_renameat2(err) < 0)
        return 10;
    struct sl_access_log_conf c = base_conf(dir);
    char msg[256];
    struct sl_alog *a = sl_alog_new(&c, 1, msg, sizeof msg);
    if (!a)
        return 11;
    struct fake f;
    for (unsigned i = 0; i < 10; i++) {
        fake_init(&f, i);
        sl_alog_record(a, 0, &f.req);
    }
    if (sl_alog_start(a) != 0)
        return 12;
    sl_alog_stop(a);
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    sl_alog_free(a);
    return st.records_written == 10 && st.segments_closed == 1 && st.segments_failed == 0 ? 0 : 13;
}

/* Where renameat2 cannot promise not to replace (EINVAL: the file system; ENOSYS: the kernel;
 * EPERM: a seccomp profile), a segment still gets its final name, through a hard link. */
static void test_rename_without_noreplace(void **state)
{
    char *dir = *state;
    static const int errs[] = {EINVAL, ENOSYS, EPERM};
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++) {
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0)
            _exit(rename_child(dir, errs[i]));
        int status = 0;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
        DIR *d = opendir(dir);
        assert_non_null(d);
        struct dirent *e;
        int files = 0;
        while ((e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            files++;
            assert_int_equal(strncmp(e->d_name, "sluice-", 7), 0); /* final, no temporary */
            char path[512];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            assert_int_equal(count_lines(path), 10);
            unlink(path);
        }
        closedir(d);
        assert_int_equal(files, 1);
    }
}

/* Kills this process (every thread) at its first pwrite at `offset` or beyond: a crash
 * between two writes. Little-endian 64-bit syscall arguments. 0 or -1. */
static int die_at_pwrite_offset(uint64_t offset)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_pwrite64, 0, 5),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[3]) + 4),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1), /* high word 0: compare the low one */
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[3])),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, (uint32_t)offset, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
}

/* A record whose path is `len` random printable bytes: text zstd cannot shrink much. */
static void record_noisy(struct sl_alog *a, unsigned from, unsigned n, size_t len)
{
    static char path[2048];
    uint32_t x = 2463534242u;
    struct fake f;
    for (unsigned i = from; i < from + n; i++) {
        fake_init(&f, i);
        path[0] = '/';
        for (size_t k = 1; k < len; k++) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            path[k] = (char)('0' + x % 75); /* '0'..'z', no quote or backslash */
        }
        f.req.path = sl_slice_make(path, len);
        sl_alog_record(a, 0, &f.req);
    }
}

/* The child of test_crash_inside_a_batch: writes a small batch, then one batch of several
 * zstd blocks whose compressed bytes take more than one write; the second write kills it. */
static int crash_child(char *dir)
{
    struct sl_access_log_conf c = base_conf(dir);
    c.flush_interval_ms = 300; /* the big batch is drained in one pass */
    char msg[256];
    struct sl_alog *a = sl_alog_new(&c, 1, msg, sizeof msg);
    if (!a)
        return 10;
    record_n(a, 0, 0, 10);
    if (sl_alog_start(a) != 0 || !poll_until(some_written, a, 3000))
        return 11;
    struct sl_alog_stats st;
    sl_alog_get_stats(a, &st);
    /* the batch's first write starts at the end block (3 bytes before the end) */
    if (die_at_pwrite_offset(st.bytes_compressed) < 0)
        return 12;
    record_noisy(a, 10, 190, 2000); /* about 420 KB of JSON, 300 KB compressed */
    sleep_ms(3000);                 /* killed meanwhile */
    return 13;
}

/*
 * A writer killed between two writes of one batch leaves whole zstd blocks of that batch
 * behind, and blocks end every 128 KiB of text, mid-line. Recovery keeps the segment only up
 * to the last block boundary at the end of a line: every recovered line is whole JSON, and
 * the batches before are all there.
 */
static void test_crash_inside_a_batch(void **state)
{
    char *dir = *state;
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(crash_child(dir));
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGSYS)
        fail_msg("the child did not die at its second write (status %#x)", (unsigned)status);
    char tmp[512];
    find_one(dir, ".sluice-", tmp, sizeof tmp);
    struct stat ts;
    assert_int_equal(stat(tmp, &ts), 0);
    assert_true(ts.st_size > 100000); /* whole blocks of the batch that was cut */

    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *a = new_alog(&c, 1);
    assert_int_equal(sl_alog_start(a), 0);
    assert_true(sl_alog_stop(a)); /* recovery runs first on the thread */
    sl_alog_free(a);
    size_t nseg;
    json_t *all = read_all_of(dir, NULL, &nseg, pid); /* fails on a line that is not JSON */
    assert_int_equal(nseg, 1);
    assert_int_equal(json_array_size(all), 10); /* the first batch, whole; the cut one, not */
    assert_ids_in_order(all, 10);
    json_decref(all);
}

/* A missing directory is created, parents included. */
static void test_directory_created(void **state)
{
    char *base = *state;
    char dir[512];
    snprintf(dir, sizeof dir, "%s/a/b", base);
    struct sl_access_log_conf c = base_conf(dir);
    struct sl_alog *a = new_alog(&c, 1);
    record_n(a, 0, 0, 3);
    sl_alog_free(a);
    json_t *recs = read_all(dir, NULL, NULL);
    assert_int_equal(json_array_size(recs), 3);
    json_decref(recs);
    remove_dir(dir);
    char mid[512];
    snprintf(mid, sizeof mid, "%s/a", base);
    rmdir(mid);
}

#define DIR_TEST(f) cmocka_unit_test_setup_teardown(f, dir_setup, dir_teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        DIR_TEST(test_fields),
        DIR_TEST(test_no_headers_key),
        DIR_TEST(test_escaping),
        DIR_TEST(test_escaping_random),
        DIR_TEST(test_truncation),
        DIR_TEST(test_ring_full_counted),
        DIR_TEST(test_ring_wraps),
        DIR_TEST(test_concurrent_producers),
        DIR_TEST(test_rotation_by_size),
        DIR_TEST(test_rotation_by_age),
        DIR_TEST(test_idle_no_segment),
        DIR_TEST(test_stop_reports_abandoned_thread),
        DIR_TEST(test_directory_unwritable),
        DIR_TEST(test_write_error_keeps_earlier_batches),
        DIR_TEST(test_leftovers_recovered),
        DIR_TEST(test_two_writers_share_directory),
        DIR_TEST(test_crash_inside_a_batch),
        DIR_TEST(test_rename_without_noreplace),
        DIR_TEST(test_directory_created),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
