#ifndef SL_CONFIG_SCHEMA_H
#define SL_CONFIG_SCHEMA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/config.h"

struct sl_yaml_node;

/*
 * Generic schema tables: each section (top level, listener, limits, upstream, ...) is a table
 * of keys with a type, bounds, default and where the value lands (offset into the target
 * struct). The walker type-checks every key, rejects unknown ones, applies defaults and
 * reports each error with its position and key path; the loader then only writes the checks
 * that span several keys.
 */

/* Loader state shared by the schema walker and the section setters. */
struct sl__config_ctx {
    struct sl_config_errors *errs;
    char *path; /* key path of the value being read, e.g. "routes[2].match" */
    size_t path_len, path_cap;
    bool failed;                         /* an error was reported (or memory ran out) */
    bool resolve;                        /* look hostnames up */
    struct sl_limits_conf global_limits; /* top-level `limits:`, copied into each listener */
    char *file_dir; /* directory of the config file, for relative paths; NULL = cwd */
};

enum sl__schema_type {
    SL__T_BOOL,     /* true | false */
    SL__T_UINT,     /* decimal integer within [min, max] */
    SL__T_DURATION, /* 250ms | 10s | 1m | 2h, stored as ms, within [min, max] */
    SL__T_SIZE,     /* 512 | 16KiB | 4KB ..., stored as bytes, within [min, max] */
    SL__T_STRING,   /* malloc'ed copy; `check` may reject it */
    SL__T_ENUM,     /* one of enum_names, stored as int (the index) */
    SL__T_SECTION,  /* nested mapping described by `section`, at base + offset */
    SL__T_LIST,     /* list of `section` elements: pointer at offset, count at count_offset */
    SL__T_CUSTOM,   /* `set` does everything */
    SL__T_STRLIST,  /* list of strings (or one string): char ** at offset, count at count_offset;
                     * `check` applies to each */
    SL__T_STRMAP,   /* mapping string -> string: struct sl_header_pair * at offset, count at
                     * count_offset; `check` applies to each value */
};

#define SL__KEY_REQUIRED 0x1u   /* missing key is an error */
#define SL__KEY_RELOADABLE 0x2u /* may change on reload (none yet: reload lands later) */
#define SL__KEY_ALLOW_NUL 0x4u  /* STRING keeps NUL bytes; its length goes to count_offset */
#define SL__KEY_NONEMPTY 0x8u   /* STRING must not be empty */
#define SL__KEY_LAZY 0x10u      /* SECTION defaults apply only when the key is present */

struct sl__schema_key;
struct sl__schema_section;

/* Validates a string value; returns NULL when fine, else a message (static or in `buf`). */
typedef const char *(*sl__schema_check_cb)(const char *s, size_t len, char *buf, size_t cap);

/* Reads node `n` for key `k` into the struct at `base`; reports its own errors. */
typedef void (*sl__schema_set_cb)(struct sl__config_ctx *c, const struct sl__schema_key *k,
                                  const struct sl_yaml_node *n, void *base);

struct sl__schema_key {
    const char *name;
    enum sl__schema_type type;
    size_t offset, size;           /* target field within base */
    size_t count_offset;           /* LIST element count; ALLOW_NUL string length */
    uint64_t min, max;             /* numeric bounds; LIST minimum element count */
    uint64_t def;                  /* default for BOOL/UINT/DURATION/SIZE/ENUM */
    const char *def_str;           /* default for STRING (copied), NULL = none */
    const char *const *enum_names; /* ENUM: NULL-terminated, value = index */
    const struct sl__schema_section *section;
    sl__schema_set_cb set;
    sl__schema_check_cb check;
    unsigned flags;
};

struct sl__schema_section {
    const struct sl__schema_key *keys;
    size_t key_count;
    size_t elem_size; /* LIST element size */
    /* Optional hooks. init: after defaults, before parsing a LIST element (index given).
     * from_scalar: a LIST element written as a plain string (`- 127.0.0.1:9001`).
     * check: after all keys, for rules that span keys; `map` is the section's node.
     * free: releases what CUSTOM setters allocated (the walker frees the rest). */
    void (*init)(struct sl__config_ctx *c, void *elem, size_t index);
    void (*from_scalar)(struct sl__config_ctx *c, const struct sl_yaml_node *n, void *elem);
    void (*check)(struct sl__config_ctx *c, const struct sl_yaml_node *map, void *elem);
    void (*free)(void *elem);
};

#define SL__SCHEMA_MAX_KEYS 32
#define SL__FIELD(T, m) .offset = offsetof(T, m), .size = sizeof(((T *)0)->m)

/* Writes each key's default into `base`. Returns false when out of memory. */
bool sl__config_schema_defaults(struct sl__config_ctx *c, const struct sl__schema_section *s,
                                void *base);

/* Type-checks mapping `n` against `s` and stores the values into `base`. */
void sl__config_schema_apply(struct sl__config_ctx *c, const struct sl__schema_section *s,
                             const struct sl_yaml_node *n, void *base);

/* Releases every string, list and nested section `s` describes in `base` (not base itself). */
void sl__config_schema_free(const struct sl__schema_section *s, void *base);

/* Key path handling: push returns the previous length to hand back to pop. */
size_t sl__config_path_push_key(struct sl__config_ctx *c, const char *key, size_t len);
size_t sl__config_path_push_index(struct sl__config_ctx *c, size_t index);
void sl__config_path_pop(struct sl__config_ctx *c, size_t saved);

/* Reports an error at `n` (1:1 when NULL) under the current key path. */
void sl__config_error(struct sl__config_ctx *c, const struct sl_yaml_node *n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * Returns the scalar text of `n`, or NULL after reporting "expected <what>, got ..." when `n`
 * is a mapping, a list or null.
 */
const char *sl__config_scalar(struct sl__config_ctx *c, const struct sl_yaml_node *n,
                              const char *what);

/* Copies `len` bytes plus a NUL; NULL (and ctx marked failed) when out of memory. */
char *sl__config_strndup(struct sl__config_ctx *c, const char *s, size_t len);

/* Quoted, escaped, shortened copy of a node's text for messages. */
const char *sl__config_q(char *buf, size_t cap, const struct sl_yaml_node *n);

#endif
