#ifndef SL_PROXY_PROXY_PROTO_H
#define SL_PROXY_PROXY_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/slice.h"
#include "core/status.h"

/*
 * The PROXY protocol, versions 1 and 2 (haproxy's "The PROXY protocol, Versions 1 & 2",
 * revision 2020/03/05): the header a load balancer in front of us puts at the start of a
 * connection to say who the client really is, and the same header built for a backend.
 *
 * The parser is strict, because whatever it accepts becomes the client address that ACLs,
 * rate limits and logs trust: anything the spec does not allow is an error and the caller
 * closes the connection. It never allocates, never reads a byte past the header, and is
 * bounded: a v1 line is at most 107 bytes, a v2 header at most SL_PP_MAX_HEADER_BYTES.
 *
 * Only connections from trusted senders may be parsed at all (spec section 5); that check
 * (core/cidr.h) and the read timeout belong to the caller.
 */

/* Longest v1 line including CRLF (spec 2.1); also enough for either builder's output. */
#define SL_PP_V1_MAX_BYTES 107
/* Fixed part of a v2 header: signature, version/command, family, length. */
#define SL_PP_V2_FIXED_BYTES 16
/* TLV bytes accepted after a v2 address block; more is SL_PP_ERR_TOO_LARGE. Real senders
 * send well under this (authority, ALPN, SSL details, a unique ID of up to 128 bytes). */
#define SL_PP_V2_MAX_TLV_BYTES 2048
/* Largest header the parser accepts: v2 with AF_UNIX addresses (2 x 108) and full TLVs. */
#define SL_PP_MAX_HEADER_BYTES (SL_PP_V2_FIXED_BYTES + 216 + SL_PP_V2_MAX_TLV_BYTES)

/* PP2_TYPE_AUTHORITY: the host name the client asked for (SNI when it spoke TLS). */
#define SL_PP2_TYPE_AUTHORITY 0x02

/* Why a header was rejected. sl_pp_err_name() gives the short name for logs and counters. */
enum sl_pp_err {
    SL_PP_ERR_NONE = 0,
    SL_PP_ERR_BAD_SIGNATURE,   /* "bad_signature": neither "PROXY " nor the v2 signature */
    SL_PP_ERR_BAD_VERSION,     /* "bad_version": v2 version nibble other than 2 */
    SL_PP_ERR_BAD_COMMAND,     /* "bad_command": v2 command other than LOCAL (0) or PROXY (1) */
    SL_PP_ERR_BAD_FAMILY,      /* "bad_family": v2 family/transport byte the spec does not
                                  define; v1 protocol other than TCP4, TCP6, UNKNOWN */
    SL_PP_ERR_BAD_LENGTH,      /* "bad_length": v2 PROXY length shorter than the family's
                                  address block */
    SL_PP_ERR_TOO_LARGE,       /* "too_large": v2 TLVs beyond SL_PP_V2_MAX_TLV_BYTES, or no
                                  CRLF within the first 107 bytes of a v1 line */
    SL_PP_ERR_BAD_TLV,         /* "bad_tlv": a v2 TLV running past the header, or two
                                  AUTHORITY TLVs (PROXY command; LOCAL's block is skipped) */
    SL_PP_ERR_BAD_SYNTAX,      /* "bad_syntax": v1 fields missing, extra, empty (double or
                                  trailing space) */
    SL_PP_ERR_BAD_ADDRESS,     /* "bad_address": v1 address invalid or not of the announced
                                  family */
    SL_PP_ERR_BAD_PORT,        /* "bad_port": v1 port not 0-65535 or with a leading zero */
    SL_PP_ERR_BAD_LINE_ENDING, /* "bad_line_ending": v1 CR or LF other than the final CRLF */
    SL_PP_ERR_COUNT
};

/* Short stable name, e.g. "bad_signature"; "none" for SL_PP_ERR_NONE, "unknown" outside the
 * enum. Static strings. */
const char *sl_pp_err_name(enum sl_pp_err err);

/* What a complete header said. */
struct sl_pp_result {
    uint8_t version; /* 1 or 2 */
    /*
     * true: keep the connection's own addresses; src and dst are AF_UNSPEC (all zero). Set
     * for v2 LOCAL (health checks from the sender itself), v1 UNKNOWN, and v2 PROXY with a
     * family we do not relay (AF_UNSPEC, UDP, AF_UNIX), which the spec says a receiver
     * falls back to UNSPEC for.
     */
    bool is_local;
    uint8_t v2_family;   /* the raw v2 family/transport byte (0x11, 0x21, ...); 0 for v1 */
    size_t header_bytes; /* bytes of the header: consume these, the payload follows */
    /* The client and the address it connected to, both AF_INET or both AF_INET6, ports set.
     * As sent: "::ffff:1.2.3.4" in a TCP6 line stays AF_INET6 (core/cidr.h matches it as
     * IPv4). */
    struct sockaddr_storage src;
    struct sockaddr_storage dst;
    /* Value of the PP2_TYPE_AUTHORITY TLV (v2 PROXY only), unvalidated bytes pointing into
     * the caller's buffer: valid until those bytes are consumed. ptr NULL when absent. */
    struct sl_slice authority;
};

/*
 * Parses a PROXY protocol header (v1 or v2, told apart by the first byte) at the start of
 * buf[0..len): the bytes received so far on the connection, always from its first byte.
 * Stateless: call again with the longer buffer when more bytes arrive.
 *   SL_OK     complete and valid: *res filled, res->header_bytes <= len.
 *   SL_AGAIN  valid so far but incomplete; nothing in *res is written.
 *   SL_ERROR  *err says why; nothing in *res is written. Decided as soon as the bytes that
 *             break the rules have arrived (a bad first byte fails at once), so a prefix of
 *             an input gives SL_AGAIN or the same result as the whole input.
 * Reads at most the header's bytes, never beyond. buf and res are the caller's; err may be
 * NULL, else it is set on every return (SL_PP_ERR_NONE unless SL_ERROR). Never calls back.
 */
enum sl_status sl_proxy_proto_parse(const void *buf, size_t len, struct sl_pp_result *res,
                                    enum sl_pp_err *err);

/*
 * Build a header for a backend connection: v1 text or v2 binary with the PROXY command,
 * TCP, no TLVs. src is the client, dst the address it connected to; both borrowed. Two
 * IPv4 addresses (IPv4-mapped IPv6 counts as IPv4) give TCP4 / 0x11; otherwise two
 * IPv4-or-IPv6 addresses give TCP6 / 0x21 with any IPv4 one mapped. A NULL address or another
 * family gives "PROXY UNKNOWN\r\n" / PROXY with AF_UNSPEC and no address block, which the
 * backend treats as "use the connection's addresses".
 * Return the bytes written to out (no NUL), or 0 and nothing written when cap is too small;
 * SL_PP_V1_MAX_BYTES is always enough.
 */
/* One of the two builders: v2 when `v2`, else v1. Same arguments and result. */
size_t sl_proxy_proto_write(bool v2, char *out, size_t cap, const struct sockaddr *src,
                            const struct sockaddr *dst);

size_t sl_proxy_proto_write_v1(char *out, size_t cap, const struct sockaddr *src,
                               const struct sockaddr *dst);
size_t sl_proxy_proto_write_v2(char *out, size_t cap, const struct sockaddr *src,
                               const struct sockaddr *dst);

#endif
