#include "proxy/proxy_proto.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "core/cidr.h"
#include "core/fmt.h"

static const uint8_t v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                   0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
static const char v1_prefix[] = "PROXY ";

#define V2_CMD_LOCAL 0x0
#define V2_CMD_PROXY 0x1
#define V2_FAM_UNSPEC 0x00
#define V2_FAM_TCP4 0x11
#define V2_FAM_TCP6 0x21

static const char *const err_names[SL_PP_ERR_COUNT] = {
    [SL_PP_ERR_NONE] = "none",
    [SL_PP_ERR_BAD_SIGNATURE] = "bad_signature",
    [SL_PP_ERR_BAD_VERSION] = "bad_version",
    [SL_PP_ERR_BAD_COMMAND] = "bad_command",
    [SL_PP_ERR_BAD_FAMILY] = "bad_family",
    [SL_PP_ERR_BAD_LENGTH] = "bad_length",
    [SL_PP_ERR_TOO_LARGE] = "too_large",
    [SL_PP_ERR_BAD_TLV] = "bad_tlv",
    [SL_PP_ERR_BAD_SYNTAX] = "bad_syntax",
    [SL_PP_ERR_BAD_ADDRESS] = "bad_address",
    [SL_PP_ERR_BAD_PORT] = "bad_port",
    [SL_PP_ERR_BAD_LINE_ENDING] = "bad_line_ending",
};

const char *sl_pp_err_name(enum sl_pp_err err)
{
    if ((unsigned)err >= SL_PP_ERR_COUNT)
        return "unknown";
    return err_names[err];
}

static enum sl_status fail(enum sl_pp_err *err, enum sl_pp_err why)
{
    if (err)
        *err = why;
    return SL_ERROR;
}

static void set_in4(struct sockaddr_storage *ss, const uint8_t addr[4], uint16_t port)
{
    struct sockaddr_in *in = (struct sockaddr_in *)(void *)ss;
    memset(ss, 0, sizeof(*ss));
    in->sin_family = AF_INET;
    memcpy(&in->sin_addr, addr, 4);
    in->sin_port = htons(port);
}

static void set_in6(struct sockaddr_storage *ss, const uint8_t addr[16], uint16_t port)
{
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)(void *)ss;
    memset(ss, 0, sizeof(*ss));
    in6->sin6_family = AF_INET6;
    memcpy(&in6->sin6_addr, addr, 16);
    in6->sin6_port = htons(port);
}

/* ---- v1 ----------------------------------------------------------------------------------- */

/* Splits off the next field of a v1 line: up to the next space or the end of the line. */
static bool next_field(const char **p, const char *end, struct sl_slice *f)
{
    if (*p > end)
        return false; /* the previous field was the last one */
    const char *s = memchr(*p, ' ', (size_t)(end - *p));
    const char *e = s ? s : end;
    *f = sl_slice_make(*p, (size_t)(e - *p));
    *p = s ? s + 1 : end + 1;
    return true;
}

static bool parse_port(struct sl_slice f, uint16_t *port)
{
    if (f.len == 0 || f.len > 5 || (f.ptr[0] == '0' && f.len > 1))
        return false;
    unsigned v = 0;
    for (size_t i = 0; i < f.len; i++) {
        if (f.ptr[i] < '0' || f.ptr[i] > '9')
            return false;
        v = v * 10 + (unsigned)(f.ptr[i] - '0');
    }
    if (v > 65535)
        return false;
    *port = (uint16_t)v;
    return true;
}

/* The line is complete: buf[0..line_len) without its CRLF, starting with "PROXY ". */
static enum sl_status parse_v1_line(const char *line, size_t line_len, struct sl_pp_result *r,
                                    enum sl_pp_err *err)
{
    const char *p = line + sizeof(v1_prefix) - 1;
    const char *end = line + line_len;
    struct sl_slice proto, src, dst, sport, dport;

    next_field(&p, end, &proto);
    bool v4 = sl_slice_eq(proto, SL_SLICE_LIT("TCP4"));
    bool v6 = sl_slice_eq(proto, SL_SLICE_LIT("TCP6"));
    if (!v4 && !v6) {
        if (proto.len == 0)
            return fail(err, SL_PP_ERR_BAD_SYNTAX);
        if (!sl_slice_eq(proto, SL_SLICE_LIT("UNKNOWN")))
            return fail(err, SL_PP_ERR_BAD_FAMILY);
        /* spec 2.1: whatever follows UNKNOWN up to the CRLF is ignored */
        r->is_local = true;
        return SL_OK;
    }
    if (!next_field(&p, end, &src) || !next_field(&p, end, &dst) || !next_field(&p, end, &sport) ||
        !next_field(&p, end, &dport) || p <= end)
        return fail(err, SL_PP_ERR_BAD_SYNTAX);
    if (src.len == 0 || dst.len == 0 || sport.len == 0 || dport.len == 0)
        return fail(err, SL_PP_ERR_BAD_SYNTAX);

    uint8_t sa[16], da[16];
    uint16_t sp, dp;
    if (v4 ? sl_cidr_parse_ipv4(src.ptr, src.len, sa) != 0
           : sl_cidr_parse_ipv6(src.ptr, src.len, sa) != 0)
        return fail(err, SL_PP_ERR_BAD_ADDRESS);
    if (v4 ? sl_cidr_parse_ipv4(dst.ptr, dst.len, da) != 0
           : sl_cidr_parse_ipv6(dst.ptr, dst.len, da) != 0)
        return fail(err, SL_PP_ERR_BAD_ADDRESS);
    if (!parse_port(sport, &sp) || !parse_port(dport, &dp))
        return fail(err, SL_PP_ERR_BAD_PORT);
    if (v4) {
        set_in4(&r->src, sa, sp);
        set_in4(&r->dst, da, dp);
    } else {
        set_in6(&r->src, sa, sp);
        set_in6(&r->dst, da, dp);
    }
    return SL_OK;
}

static enum sl_status parse_v1(const char *b, size_t len, struct sl_pp_result *r,
                               enum sl_pp_err *err)
{
    size_t pre = sizeof(v1_prefix) - 1;
    if (memcmp(b, v1_prefix, len < pre ? len : pre) != 0)
        return fail(err, SL_PP_ERR_BAD_SIGNATURE);
    /* Look for the end of the line only within the 107 bytes the line may take, so a
     * sender that never ends it costs at most that much per call. */
    size_t scan = len < SL_PP_V1_MAX_BYTES ? len : SL_PP_V1_MAX_BYTES;
    for (size_t i = pre; i < scan; i++) {
        if (b[i] == '\n')
            return fail(err, SL_PP_ERR_BAD_LINE_ENDING);
        if (b[i] != '\r')
            continue;
        if (i + 1 >= SL_PP_V1_MAX_BYTES)
            return fail(err, SL_PP_ERR_TOO_LARGE); /* its LF would be byte 108 */
        if (i + 1 >= len)
            return SL_AGAIN;
        if (b[i + 1] != '\n')
            return fail(err, SL_PP_ERR_BAD_LINE_ENDING);
        r->version = 1;
        r->header_bytes = i + 2;
        return parse_v1_line(b, i, r, err);
    }
    if (len >= SL_PP_V1_MAX_BYTES)
        return fail(err, SL_PP_ERR_TOO_LARGE);
    return SL_AGAIN;
}

/* ---- v2 ----------------------------------------------------------------------------------- */

/* Address block length for a family/transport byte, or -1 for bytes the spec does not define
 * (spec 2.2: "must be rejected as invalid by receivers"). */
static int v2_addr_len(uint8_t fam)
{
    switch (fam) {
    case 0x00:
        return 0;
    case 0x11: /* TCP over IPv4 */
    case 0x12: /* UDP over IPv4 */
        return 12;
    case 0x21: /* TCP over IPv6 */
    case 0x22: /* UDP over IPv6 */
        return 36;
    case 0x31: /* UNIX stream */
    case 0x32: /* UNIX datagram */
        return 216;
    default:
        return -1;
    }
}

static enum sl_status parse_v2_tlvs(const uint8_t *b, size_t pos, size_t end,
                                    struct sl_pp_result *r, enum sl_pp_err *err)
{
    while (pos < end) {
        if (end - pos < 3)
            return fail(err, SL_PP_ERR_BAD_TLV);
        uint8_t type = b[pos];
        size_t vlen = (size_t)b[pos + 1] << 8 | b[pos + 2];
        pos += 3;
        if (vlen > end - pos)
            return fail(err, SL_PP_ERR_BAD_TLV);
        if (type == SL_PP2_TYPE_AUTHORITY) {
            /* two would leave "which host?" to whoever reads them */
            if (r->authority.ptr)
                return fail(err, SL_PP_ERR_BAD_TLV);
            r->authority = sl_slice_make((const char *)b + pos, vlen);
        }
        pos += vlen;
    }
    return SL_OK;
}

static enum sl_status parse_v2(const uint8_t *b, size_t len, struct sl_pp_result *r,
                               enum sl_pp_err *err)
{
    /* Each check runs as soon as its byte has arrived, so garbage fails at once. */
    if (memcmp(b, v2_sig, len < sizeof(v2_sig) ? len : sizeof(v2_sig)) != 0)
        return fail(err, SL_PP_ERR_BAD_SIGNATURE);
    if (len < 13)
        return SL_AGAIN;
    unsigned version = b[12] >> 4, cmd = b[12] & 0x0F;
    if (version != 2)
        return fail(err, SL_PP_ERR_BAD_VERSION);
    if (cmd != V2_CMD_LOCAL && cmd != V2_CMD_PROXY)
        return fail(err, SL_PP_ERR_BAD_COMMAND);
    if (len < 14)
        return SL_AGAIN;
    uint8_t fam = b[13];
    int alen = v2_addr_len(fam);
    if (alen < 0)
        return fail(err, SL_PP_ERR_BAD_FAMILY);
    if (len < SL_PP_V2_FIXED_BYTES)
        return SL_AGAIN;
    size_t blen = (size_t)b[14] << 8 | b[15];
    if (blen > (size_t)alen + SL_PP_V2_MAX_TLV_BYTES)
        return fail(err, SL_PP_ERR_TOO_LARGE);
    /* LOCAL discards the block, family included (spec 2.2), so its length is not held to the
     * family's; PROXY must carry the addresses it announces. */
    if (cmd == V2_CMD_PROXY && blen < (size_t)alen)
        return fail(err, SL_PP_ERR_BAD_LENGTH);
    if (len - SL_PP_V2_FIXED_BYTES < blen)
        return SL_AGAIN;

    r->version = 2;
    r->v2_family = fam;
    r->header_bytes = SL_PP_V2_FIXED_BYTES + blen;
    const uint8_t *a = b + SL_PP_V2_FIXED_BYTES;
    if (cmd == V2_CMD_LOCAL || fam == V2_FAM_UNSPEC) {
        /* nothing in the block describes the connection; what is there is not ours to read */
        r->is_local = true;
        return SL_OK;
    }
    if (fam == V2_FAM_TCP4) {
        set_in4(&r->src, a, (uint16_t)(a[8] << 8 | a[9]));
        set_in4(&r->dst, a + 4, (uint16_t)(a[10] << 8 | a[11]));
    } else if (fam == V2_FAM_TCP6) {
        set_in6(&r->src, a, (uint16_t)(a[32] << 8 | a[33]));
        set_in6(&r->dst, a + 16, (uint16_t)(a[34] << 8 | a[35]));
    } else {
        r->is_local = true; /* UDP or UNIX: the spec's fallback to UNSPEC */
    }
    return parse_v2_tlvs(b, SL_PP_V2_FIXED_BYTES + (size_t)alen, r->header_bytes, r, err);
}

enum sl_status sl_proxy_proto_parse(const void *buf, size_t len, struct sl_pp_result *res,
                                    enum sl_pp_err *err)
{
    if (err)
        *err = SL_PP_ERR_NONE;
    if (len == 0)
        return SL_AGAIN;
    const uint8_t *b = buf;
    struct sl_pp_result r;
    memset(&r, 0, sizeof(r));
    enum sl_status st;
    if (b[0] == v2_sig[0])
        st = parse_v2(b, len, &r, err);
    else if (b[0] == (uint8_t)v1_prefix[0])
        st = parse_v1(buf, len, &r, err);
    else
        return fail(err, SL_PP_ERR_BAD_SIGNATURE);
    if (st == SL_OK)
        *res = r;
    return st;
}

/* ---- builders ----------------------------------------------------------------------------- */

/* The address of sa as 16 bytes of IPv6 (IPv4 mapped) and its port; false for other
 * families. *is_v4 says whether it is IPv4, spelled either way. */
static bool addr_of(const struct sockaddr *sa, uint8_t a[16], uint16_t *port, bool *is_v4)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (!sa)
        return false;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        memcpy(a, mapped, 12);
        memcpy(a + 12, &in->sin_addr, 4);
        *port = ntohs(in->sin_port);
        *is_v4 = true;
        return true;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        memcpy(a, &in6->sin6_addr, 16);
        *port = ntohs(in6->sin6_port);
        *is_v4 = memcmp(a, mapped, 12) == 0;
        return true;
    }
    return false;
}

/* Which form a header takes: 4 for TCP4, 6 for TCP6, 0 for UNKNOWN/UNSPEC. */
static int pick_form(const struct sockaddr *src, const struct sockaddr *dst, uint8_t sa[16],
                     uint16_t *sp, uint8_t da[16], uint16_t *dp)
{
    bool s4, d4;
    if (!addr_of(src, sa, sp, &s4) || !addr_of(dst, da, dp, &d4))
        return 0;
    return s4 && d4 ? 4 : 6;
}

static size_t put_text(char *out, size_t pos, const char *s, size_t n)
{
    memcpy(out + pos, s, n);
    return pos + n;
}

static size_t put_addr(char *out, size_t pos, int form, const uint8_t a[16])
{
    char text[INET6_ADDRSTRLEN];
    if (form == 4) {
        for (int i = 12; i < 16; i++) {
            if (i > 12)
                out[pos++] = '.';
            pos += sl_fmt_u64(out + pos, a[i]);
        }
        return pos;
    }
    /* inet_ntop cannot fail for AF_INET6 with this buffer; the empty fallback keeps the
     * function total and would make the line unparseable rather than wrong */
    if (!inet_ntop(AF_INET6, a, text, sizeof(text)))
        text[0] = '\0';
    return put_text(out, pos, text, strlen(text));
}

size_t sl_proxy_proto_write_v1(char *out, size_t cap, const struct sockaddr *src,
                               const struct sockaddr *dst)
{
    /* longest line: "PROXY TCP6 " + 2 x 45 + 2 x " 65535" + CRLF stays well under this */
    char line[128];
    uint8_t sa[16], da[16];
    uint16_t sp = 0, dp = 0;
    int form = pick_form(src, dst, sa, &sp, da, &dp);
    size_t n;
    if (form == 0) {
        n = put_text(line, 0, "PROXY UNKNOWN\r\n", 15);
    } else {
        n = put_text(line, 0, form == 4 ? "PROXY TCP4 " : "PROXY TCP6 ", 11);
        n = put_addr(line, n, form, sa);
        line[n++] = ' ';
        n = put_addr(line, n, form, da);
        line[n++] = ' ';
        n += sl_fmt_u64(line + n, sp);
        line[n++] = ' ';
        n += sl_fmt_u64(line + n, dp);
        n = put_text(line, n, "\r\n", 2);
    }
    if (n > cap)
        return 0;
    memcpy(out, line, n);
    return n;
}

size_t sl_proxy_proto_write_v2(char *out, size_t cap, const struct sockaddr *src,
                               const struct sockaddr *dst)
{
    uint8_t h[SL_PP_V2_FIXED_BYTES + 36];
    uint8_t sa[16], da[16];
    uint16_t sp = 0, dp = 0;
    int form = pick_form(src, dst, sa, &sp, da, &dp);
    size_t alen = form == 4 ? 12 : form == 6 ? 36 : 0;
    memcpy(h, v2_sig, sizeof(v2_sig));
    h[12] = 0x20 | V2_CMD_PROXY;
    h[13] = form == 4 ? V2_FAM_TCP4 : form == 6 ? V2_FAM_TCP6 : V2_FAM_UNSPEC;
    h[14] = 0;
    h[15] = (uint8_t)alen;
    uint8_t *a = h + SL_PP_V2_FIXED_BYTES;
    if (form == 4) {
        memcpy(a, sa + 12, 4);
        memcpy(a + 4, da + 12, 4);
        a += 8;
    } else if (form == 6) {
        memcpy(a, sa, 16);
        memcpy(a + 16, da, 16);
        a += 32;
    }
    if (form != 0) {
        a[0] = (uint8_t)(sp >> 8);
        a[1] = (uint8_t)sp;
        a[2] = (uint8_t)(dp >> 8);
        a[3] = (uint8_t)dp;
    }
    size_t n = SL_PP_V2_FIXED_BYTES + alen;
    if (n > cap)
        return 0;
    memcpy(out, h, n);
    return n;
}

size_t sl_proxy_proto_write(bool v2, char *out, size_t cap, const struct sockaddr *src,
                            const struct sockaddr *dst)
{
    return v2 ? sl_proxy_proto_write_v2(out, cap, src, dst)
              : sl_proxy_proto_write_v1(out, cap, src, dst);
}
