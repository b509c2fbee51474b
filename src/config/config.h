#ifndef SL_CONFIG_CONFIG_H
#define SL_CONFIG_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/*
 * The loaded configuration: an immutable snapshot built at start-up (and later on reload).
 * Everything here is malloc'ed at load time and released by sl_config_free(). Strings are
 * NUL-terminated copies. Durations are milliseconds, sizes bytes.
 *
 * Defaults flow global -> listener -> route; the loader has already merged them, so the
 * runtime reads one field and never looks up a parent.
 */

enum sl_log_level { SL_LOG_ERROR = 0, SL_LOG_WARN, SL_LOG_INFO, SL_LOG_DEBUG };

/* HTTP methods as a bitmask, so a route's method set is one AND. */
enum sl_method {
    SL_METHOD_OTHER = 0,
    SL_METHOD_GET = 1u << 0,
    SL_METHOD_HEAD = 1u << 1,
    SL_METHOD_POST = 1u << 2,
    SL_METHOD_PUT = 1u << 3,
    SL_METHOD_DELETE = 1u << 4,
    SL_METHOD_PATCH = 1u << 5,
    SL_METHOD_OPTIONS = 1u << 6,
    SL_METHOD_TRACE = 1u << 7,
    SL_METHOD_CONNECT = 1u << 8,
};

struct sl_limits_conf {
    uint64_t max_header_bytes;       /* request line + headers; default 16KiB, 431 beyond */
    uint64_t max_header_count;       /* default 100, 431 beyond */
    uint64_t max_uri_bytes;          /* default 8KiB, 414 beyond */
    uint64_t max_body_bytes;         /* default 10MiB, 413 beyond; 0 = unlimited */
    uint64_t header_timeout_ms;      /* whole request head must arrive within; default 10s, 408 */
    uint64_t body_timeout_ms;        /* max gap between body reads; default 60s, 408 */
    uint64_t min_body_rate;          /* bytes/s a body must average; default 100; 0 = off, 408 */
    uint64_t min_body_rate_after_ms; /* ... from this long after the body began; default 10s */
    uint64_t idle_timeout_ms;        /* keep-alive idle between requests; default 60s, close */
    uint64_t send_timeout_ms;        /* max gap while a client does not read; default 60s, close */
    uint64_t max_requests_per_conn;  /* default 0 = unlimited */
};

struct sl_cidr;

/* `protection:` on a listener: who may connect, and how much. */
struct sl_protection_conf {
    struct sl_cidr *allow; /* when non-empty, only these addresses */
    size_t allow_count;
    struct sl_cidr *deny; /* never these, even when allowed */
    size_t deny_count;
    uint32_t max_connections_per_ip;   /* open at once per client address; 0 = no cap */
    char *new_connections_per_ip;      /* "50/s" as written, NULL = no rate */
    uint64_t new_connection_period_us; /* 1 s / rate, 0 = no rate */
    uint32_t new_connections_burst;    /* above the rate; default = one second's worth */
    uint32_t tracked_addresses;        /* addresses tracked at once; default 65536 */
};

struct sl_tls_cert_conf {
    char *cert; /* PEM chain, leaf first; relative paths are relative to the config file */
    char *key;
};

enum sl_tls_version { SL_TLS_V1_2 = 0, SL_TLS_V1_3 };
enum sl_tls_client_auth_conf {
    SL_TLS_CLIENT_AUTH_CONF_REQUIRED = 0,
    SL_TLS_CLIENT_AUTH_CONF_OPTIONAL
};

/* `tls:` on a listener. Present = the listener speaks TLS. */
struct sl_listener_tls_conf {
    bool enabled;
    struct sl_tls_cert_conf *certificates; /* [0] is the default (no SNI, no match) */
    size_t certificate_count;
    int min_version;    /* enum sl_tls_version, default 1.2 */
    char *ciphers;      /* TLS 1.2 list, NULL = the modern default */
    char *ciphersuites; /* TLS 1.3 suites, NULL = OpenSSL's */
    char **alpn;        /* NULL = [http/1.1] on http listeners, none on tcp ones */
    size_t alpn_count;
    char *client_ca;               /* mTLS: CAs for client certificates, NULL = no mTLS */
    int client_auth;               /* enum sl_tls_client_auth_conf, default required */
    bool session_tickets;          /* default true */
    uint64_t ticket_rotation_ms;   /* default 1h */
    uint64_t handshake_timeout_ms; /* default 10s */
    bool watch;                    /* reload certificates when their files change; default true */
};

/* `proxy_protocol:` on a listener. */
struct sl_pp_accept_conf {
    bool accept;
    struct sl_cidr *trusted; /* only these peers may send a header (required with accept) */
    size_t trusted_count;
    uint64_t timeout_ms; /* for the header to arrive; default 5s */
};

enum sl_listener_protocol { SL_LISTENER_HTTP = 0, SL_LISTENER_TCP };

struct sl_listener_conf {
    char *name;
    char *address; /* as written, e.g. "127.0.0.1:8080" or "[::1]:8080" */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    int backlog; /* default 4096 */
    struct sl_limits_conf limits;
    struct sl_protection_conf protection;
    int protocol;          /* enum sl_listener_protocol */
    char *upstream;        /* with protocol: tcp */
    size_t upstream_index; /* resolved */
    struct sl_listener_tls_conf tls;
    struct sl_pp_accept_conf proxy_protocol;
    int line, col; /* position in the file, for run-time messages */
};

struct sl_endpoint_conf {
    char *address; /* host:port as written */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    uint32_t weight; /* 1..1000, default 1 */
    char *zone;      /* may be NULL */
};

enum sl_balance { SL_BALANCE_ROUND_ROBIN = 0, SL_BALANCE_LEAST_REQUEST, SL_BALANCE_HASH };
enum sl_hash_on { SL_HASH_IP = 0, SL_HASH_HEADER, SL_HASH_COOKIE };

/* A set of HTTP statuses 100..599 as a bitmap (index status - 100). */
struct sl_status_set {
    uint64_t bits[8];
};

static inline bool sl_status_set_has(const struct sl_status_set *s, int status)
{
    if (status < 100 || status > 599)
        return false;
    unsigned i = (unsigned)(status - 100);
    return (s->bits[i / 64] >> (i % 64)) & 1u;
}

/* `health.passive:` -- outlier detection, which is also the per-endpoint circuit breaker
 * (closed = in rotation, open = ejected, half-open = probing). */
struct sl_passive_health_conf {
    bool enabled;                    /* default true */
    uint32_t consecutive_failures;   /* eject after this many in a row; default 5; 0 = off */
    uint32_t failure_ratio_permille; /* eject above this failure ratio; default 0 = off */
    uint32_t min_requests;           /* requests in the window before the ratio counts; 20 */
    uint64_t window_ms;              /* sliding window of the ratio; default 10s */
    uint64_t ejection_ms;            /* first ejection time; default 5s */
    uint64_t max_ejection_ms;        /* cap of the growing ejection time; default 5m */
    uint32_t max_ejection_percent;   /* share of the pool that may be ejected; default 50 */
    uint32_t half_open_requests;     /* probe requests that must succeed; default 1 */
    struct sl_status_set statuses;   /* response statuses counted as failures; 502, 503, 504 */
};

/* `health.active:` -- checks run by one thread per process. */
struct sl_active_health_conf {
    bool enabled;                  /* the section is present */
    char *path;                    /* HTTP GET path; NULL = TCP connect check */
    char *host;                    /* Host header; default the endpoint address */
    uint64_t interval_ms;          /* default 5s */
    uint64_t timeout_ms;           /* default 1s */
    uint32_t healthy;              /* successes in a row to mark healthy; default 2 */
    uint32_t unhealthy;            /* failures in a row to mark unhealthy; default 3 */
    struct sl_status_set statuses; /* expected; default 200..399 */
};

/* `circuit_breaker:` -- per upstream, across all workers; 0 = no limit. */
struct sl_breaker_conf {
    uint32_t max_connections; /* open connections (busy and idle) */
    uint32_t max_pending;     /* requests waiting for a connection to open */
    uint32_t max_requests;    /* requests in flight */
};

/* Bits of sl_retry_conf.on besides statuses. */
enum sl_retry_on {
    SL_RETRY_CONNECT_FAILURE = 1u << 0,
    SL_RETRY_RESET = 1u << 1,
    SL_RETRY_TIMEOUT = 1u << 2,
};

/* `retries:` on an upstream (or a route, which overrides it). */
struct sl_retry_conf {
    uint32_t attempts;             /* retries after the first try; default 2; 0 = none */
    uint32_t on;                   /* enum sl_retry_on bits */
    struct sl_status_set statuses; /* response statuses retried */
    uint64_t per_try_timeout_ms;   /* response wait of one try; 0 = timeouts.response */
    uint64_t backoff_base_ms;      /* default 25ms */
    uint64_t backoff_max_ms;       /* default 250ms */
    uint32_t budget_percent;       /* retries per requests over 10s; default 20 */
    uint32_t min_retries;          /* per 10s, always allowed; default 10 */
    bool non_idempotent;           /* retry POST/PATCH without Idempotency-Key too */
    uint64_t max_body_bytes;       /* request body kept for a retry; default 64KiB */
};

/* `zone_aware:` */
struct sl_zone_aware_conf {
    bool enabled;           /* default false */
    uint32_t panic_percent; /* healthy share below which health is ignored; default 50 */
};

enum sl_discovery_kind {
    SL_DISCOVERY_NONE = 0,
    SL_DISCOVERY_DNS,
    SL_DISCOVERY_SRV,
    SL_DISCOVERY_FILE
};

/* `discovery:` -- one source besides the static `endpoints:`. */
struct sl_discovery_conf {
    enum sl_discovery_kind kind;
    char *name;               /* DNS name (dns/srv) or file path (file) */
    uint32_t port;            /* dns: port of every address */
    uint32_t weight;          /* dns/srv: weight of every address; default 1 (srv: record's) */
    char *zone;               /* dns/srv: zone of every address, or NULL */
    uint64_t min_interval_ms; /* re-resolve no sooner than; default 1s */
    uint64_t max_interval_ms; /* and no later than (TTL is honoured between); default 5m */
    int line, col;
};

/* `tls:` on an upstream: connect to the endpoints with TLS. */
struct sl_upstream_tls_conf {
    bool enabled;
    bool verify;       /* default true: certificate chain and name */
    char *ca_file;     /* NULL = the system's trust store */
    char *sni;         /* server name to send and verify; NULL = the endpoint's host name */
    char *client_cert; /* optional client certificate chain, with client_key */
    char *client_key;
    int min_version; /* enum sl_tls_version, default 1.2 */
    char **alpn;     /* offered; default [http/1.1] */
    size_t alpn_count;
};

enum sl_pp_send { SL_PP_SEND_OFF = 0, SL_PP_SEND_V1, SL_PP_SEND_V2 };

struct sl_upstream_conf {
    char *name;
    enum sl_balance balance; /* default round_robin */
    enum sl_hash_on hash_on; /* with balance: hash; default ip */
    char *hash_key;          /* header or cookie name for hash_on header:/cookie: */
    struct sl_endpoint_conf *endpoints;
    size_t endpoint_count;
    uint32_t keepalive_max_idle;        /* per worker; default 64; 0 disables pooling */
    uint64_t keepalive_idle_timeout_ms; /* default 30s */
    uint64_t connect_timeout_ms;        /* default 1s */
    uint64_t response_timeout_ms;       /* until the response head arrives; default 15s, 504 */
    uint64_t idle_timeout_ms;           /* max gap while streaming a body; default 60s */
    struct sl_passive_health_conf passive;
    struct sl_active_health_conf active;
    struct sl_breaker_conf breaker;
    struct sl_retry_conf retries;
    struct sl_zone_aware_conf zone_aware;
    struct sl_discovery_conf discovery;
    struct sl_upstream_tls_conf tls;
    int proxy_protocol; /* enum sl_pp_send: header sent first on each connection */
    int line, col;
};

struct sl_header_pair {
    char *name;
    char *value;
};

struct sl_header_ops_conf {
    struct sl_header_pair *set; /* replace any existing header of that name */
    size_t set_count;
    struct sl_header_pair *add; /* append */
    size_t add_count;
    char **remove; /* names */
    size_t remove_count;
};

struct sl_direct_response_conf {
    int status; /* 100..599 */
    char *body; /* may be empty, never NULL when direct response is set */
    size_t body_len;
    char *content_type; /* default "text/plain" */
};

struct sl_route_match_conf {
    char *host;          /* exact "api.example.com", wildcard "*.example.com", or NULL = any */
    char *path;          /* exact path, or NULL */
    char *path_prefix;   /* prefix, or NULL; at most one of path / path_prefix */
    uint32_t methods;    /* bitmask of enum sl_method; 0 with no method_names = any */
    char **method_names; /* as written, for methods outside the enum (SL_METHOD_OTHER);
                          * a route with only such methods has methods == 0, so test both */
    size_t method_name_count;
    struct sl_header_pair *headers; /* all must be present with exactly this value */
    size_t header_count;
};

struct sl_config_filter_type;

/* One entry of a `filters:` list: its type (see config/filter_conf.h) and its parsed config,
 * the struct that type's schema fills. */
struct sl_filter_conf {
    const struct sl_config_filter_type *type;
    void *conf;
    char *where; /* key path, e.g. "routes[1].filters[0].jwt", for run-time messages */
    int line, col;
};

/* `redis:` at the top level: the server global rate limits share. */
struct sl_redis_conf {
    char *address; /* host:port as written; NULL when no `redis:` section */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    char *username;              /* AUTH user (Redis 6 ACL), or NULL */
    char *password;              /* AUTH password, or NULL */
    uint32_t db;                 /* SELECT, default 0 */
    uint64_t timeout_ms;         /* per command, default 50ms */
    uint64_t connect_timeout_ms; /* default 200ms */
    char *key_prefix;            /* default "sluice:" */
};

/* `consumers:`: who may call with an API key. */
struct sl_consumer_conf {
    char *name;
    char *api_key;                /* plain key, or NULL */
    unsigned char key_sha256[32]; /* SHA-256 of the key (from api_key or api_key_sha256) */
    bool has_sha256;
    int line, col;
};

struct sl_route_conf {
    char *name;
    size_t metrics_slot; /* set by the metrics module before the config goes live */
    size_t index;        /* position in the file; the final tie-breaker */
    struct sl_route_match_conf match;
    char **listeners; /* listener names this route serves; NULL/0 = all */
    size_t listener_count;
    char *upstream;        /* name as written; NULL for direct_response */
    size_t upstream_index; /* resolved index into sl_config.upstreams */
    bool strip_prefix;     /* remove match.path_prefix from the path sent upstream */
    char *rewrite_prefix;  /* replace match.path_prefix with this (implies strip); or NULL */
    struct sl_header_ops_conf request_headers;
    struct sl_header_ops_conf response_headers;
    bool has_direct_response;
    struct sl_direct_response_conf direct_response;
    struct sl_filter_conf *filters; /* the route's own, run after default_filters */
    size_t filter_count;
    bool skip_default_filters;
    bool has_retries; /* the route has its own `retries:` (else the upstream's apply) */
    struct sl_retry_conf retries;
    int line, col;
};

/* `admin:`: the operations listener (status, metrics, runtime changes). */
struct sl_admin_conf {
    char *address; /* NULL = no admin listener */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    bool loopback;    /* the address is 127.0.0.0/8 or ::1 */
    char *token_file; /* bearer token (first line); required when not on loopback */
};

enum sl_ship_method { SL_SHIP_PUT = 0, SL_SHIP_POST };

/* `access_log:`: per-request records, batched into zstd segments. Off when directory is NULL. */
struct sl_access_log_conf {
    char *directory;              /* segments are written here (created when missing) */
    uint64_t buffer_bytes;        /* per-worker ring, default 8MiB */
    uint64_t segment_max_bytes;   /* close a segment past this many compressed bytes, 64MiB */
    uint64_t segment_max_age_ms;  /* ... or this long after it opened, default 60s */
    uint64_t flush_interval_ms;   /* how often the log thread drains the rings, default 200ms */
    char *ship_url;               /* http(s) collector; NULL = segments stay in the directory */
    int ship_method;              /* enum sl_ship_method, default PUT (to url/<segment name>) */
    uint64_t ship_timeout_ms;     /* per attempt, default 5s */
    uint64_t ship_backoff_max_ms; /* retry backoff cap, default 60s */
    char **headers;               /* request headers recorded as they came (minus redacted) */
    size_t header_count;
    char **redact_headers; /* never recorded, whatever `headers` says; default below */
    size_t redact_header_count;
};

/* `drain:`: leaving gracefully (SIGTERM, POST /drain, a spot-interruption notice). */
struct sl_drain_conf {
    uint64_t grace_ms;           /* keep serving after /ready turned 503; default 0 */
    char *notice_url;            /* polled; a 200 answer starts the drain; NULL = off */
    uint64_t notice_interval_ms; /* default 5s */
};

/* `reload:`: safe-reload. */
struct sl_reload_conf {
    uint32_t rollback_permille; /* `rollback_on_5xx_ratio` in 1/1000; 0 = never roll back */
    uint64_t window_ms;         /* watched after a reload, default 30s */
    uint32_t min_requests;      /* responses needed in the window before judging, default 20 */
};

struct sl_config {
    char *path;                  /* file it was loaded from */
    unsigned workers;            /* 0 = auto (one per online CPU) */
    uint32_t max_connections;    /* client connections per process; 0 = auto (from RLIMIT_NOFILE) */
    uint64_t max_buffer_memory;  /* I/O buffers and arenas, bytes; 0 = auto (half the RAM) */
    uint64_t drain_timeout_ms;   /* default 10s */
    enum sl_log_level log_level; /* `log_level: error|warn|info|debug`, default info */
    struct sl_listener_conf *listeners;
    size_t listener_count;
    struct sl_upstream_conf *upstreams;
    size_t upstream_count;
    struct sl_route_conf *routes;
    size_t route_count;
    struct sl_filter_conf *default_filters; /* run first on every route */
    size_t default_filter_count;
    struct sl_redis_conf redis;
    struct sl_consumer_conf *consumers;
    size_t consumer_count;
    char *zone;         /* this instance's zone: `zone:`, else $SLUICE_ZONE, else NULL */
    char **dns_servers; /* `resolver.servers`: ip[:port] list; empty = /etc/resolv.conf */
    size_t dns_server_count;
    uint64_t dns_timeout_ms; /* `resolver.timeout`, default 2s */
    struct sl_admin_conf admin;
    struct sl_access_log_conf access_log;
    struct sl_drain_conf drain;
    struct sl_reload_conf reload;
    double vcpu_hour_usd; /* `cost.vcpu_hour_usd`: price of one vCPU for an hour; 0 = unknown */
};

/* One error found while loading: "file:line:col: key.path: message". */
struct sl_config_error {
    int line, col;
    char *path; /* key path, e.g. "routes[2].upstream" */
    char *message;
};

struct sl_config_errors {
    char *file;
    struct sl_config_error *items;
    size_t count;
};

/*
 * Loads and validates the YAML file at `path`: parse and type-check every key against the
 * schema, resolve names (route -> upstream, route -> listeners), and build the snapshot.
 * On success returns 0 and sets *out (caller owns; release with sl_config_free()).
 * On failure returns -1, *out is NULL, and `errs` holds every error found (caller releases
 * with sl_config_errors_dispose()). Never calls back.
 */
int sl_config_load(const char *path, struct sl_config **out, struct sl_config_errors *errs);

/* Same as sl_config_load() but from a string in memory; `name` is used in messages. */
int sl_config_load_string(const char *name, const char *yaml, size_t len, struct sl_config **out,
                          struct sl_config_errors *errs);

/* Writes every error as "file:line:col: path: message\n" to `fp` (a FILE *). */
void sl_config_errors_print(const struct sl_config_errors *errs, void *fp);

void sl_config_errors_dispose(struct sl_config_errors *errs);

void sl_config_free(struct sl_config *cfg);

/* Whether s[0..len) is a valid name (listeners, routes, upstreams, zones): 1 to 64 letters,
 * digits, '_', '-' or '.'. */
bool sl_config_is_name(const char *s, size_t len);

/* Parses "250ms", "10s", "1m", "2h", "1500" (ms). Returns 0 or -EINVAL. The loader itself
 * rejects a bare number in the file (ambiguous: seconds or ms?) before calling this. */
int sl_config_parse_duration(const char *s, uint64_t *out_ms);

/* Parses "16KiB", "10MiB", "1GiB", "512", "4KB" (KB = 1000). Returns 0 or -EINVAL. */
int sl_config_parse_size(const char *s, uint64_t *out_bytes);

/*
 * Parses "127.0.0.1:80", "[::1]:80", "localhost:80" (resolved with getaddrinfo at load; IP
 * literals never touch the resolver). Port 1..65535. Returns 0, -EINVAL on bad syntax, or
 * -ENOENT when the lookup fails. With resolution off (sl_config_set_resolve(false)) a valid
 * hostname returns 0 with *out zeroed and *out_len 0.
 */
int sl_config_parse_address(const char *s, struct sockaddr_storage *out, socklen_t *out_len);

/*
 * Turns hostname lookups on (the default) or off for later loads and address parses. Off is
 * for fuzzers and offline checks: hostnames are syntax-checked only and stay unresolved
 * (addr_len 0). Process-wide; call before loading, not while another thread loads.
 */
void sl_config_set_resolve(bool resolve);

/* Maps a method token to its bit; SL_METHOD_OTHER when not in the enum. */
enum sl_method sl_method_from_token(const char *p, size_t len);

#endif
