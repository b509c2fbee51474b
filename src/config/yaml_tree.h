#ifndef SL_CONFIG_YAML_TREE_H
#define SL_CONFIG_YAML_TREE_H

#include <stdbool.h>
#include <stddef.h>

struct sl_config_errors;

/*
 * A YAML document as a small tree with 1-based line/column marks, built with libyaml's event
 * parser. Only what the schema needs: scalars (always strings; typing happens in the schema),
 * mappings with unique scalar keys (in file order), and sequences.
 */
enum sl_yaml_kind { SL_YAML_SCALAR = 0, SL_YAML_MAP, SL_YAML_SEQ };

struct sl_yaml_node {
    enum sl_yaml_kind kind;
    int line, col;
    /* SCALAR: NUL-terminated value; may contain NUL bytes when written as "\0", hence len. */
    char *str;
    size_t len;
    bool is_null; /* plain empty, "~" or "null": a key with no value */
    bool is_dup;  /* key repeated in its mapping; dropped before the tree is returned */
    /* MAP: keys[i] -> items[i]; SEQ: items[i]. */
    struct sl_yaml_node **keys;
    struct sl_yaml_node **items;
    size_t count, cap;
};

/* Nesting deeper than this is rejected, so every recursive walk has a bounded stack. */
#define SL_YAML_MAX_DEPTH 64

/*
 * Parses one YAML document from `buf[0..len)` and sets *root (caller owns; release with
 * sl__config_yaml_free); an empty document yields an empty mapping. Problems that leave a
 * usable tree (a duplicate key, whose later pair is dropped; an anchor or alias, read as null)
 * are appended to `errs` and 0 is still returned, so the schema can report more errors; the
 * caller fails the load when `errs` is not empty. A syntax error, nesting deeper than
 * SL_YAML_MAX_DEPTH, a second document or running out of memory is appended too and returns -1
 * with *root NULL. `errs->file` is left untouched.
 */
int sl__config_yaml_parse(const char *buf, size_t len, struct sl_config_errors *errs,
                          struct sl_yaml_node **root);

void sl__config_yaml_free(struct sl_yaml_node *n);

/* Value for `key` in mapping `map`, or NULL when absent or `map` is not a mapping. */
const struct sl_yaml_node *sl__config_yaml_get(const struct sl_yaml_node *map, const char *key);

/* "a mapping", "a list", "null" or "a string", for type errors. */
const char *sl__config_yaml_kind_name(const struct sl_yaml_node *n);

#endif
