#include "filters/filter_set.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "config/filter_conf.h"
#include "filters/json_scratch.h"

void sl_filters_register_config(void)
{
    /* Before any other thread exists: jansson's allocator is process-wide. */
    sl_json_scratch_install();
    static const struct sl_config_filter_type *types[16];
    size_t n = 0, count;
    const struct sl_filter_ops *const *reg = sl_filter_registry(&count);
    for (size_t i = 0; i < count && n < sizeof types / sizeof types[0]; i++)
        if (reg[i]->conf_type)
            types[n++] = reg[i]->conf_type;
    sl_config_set_filter_types(types, n);
}

static const struct sl_filter_ops *ops_for(const struct sl_filter_conf *fc)
{
    size_t count;
    const struct sl_filter_ops *const *reg = sl_filter_registry(&count);
    for (size_t i = 0; i < count; i++)
        if (reg[i]->conf_type == fc->type)
            return reg[i];
    return NULL;
}

static int add_instance(struct sl_filter_set *set, const struct sl_config *cfg,
                        const struct sl_filter_conf *fc, char *err, size_t err_len)
{
    const struct sl_filter_ops *ops = ops_for(fc);
    char msg[256] = "";
    if (!ops) {
        snprintf(err, err_len, "%s:%d:%d: %s: filter type not registered", cfg->path, fc->line,
                 fc->col, fc->where);
        return -1;
    }
    void *state = NULL;
    if (ops->create && ops->create(fc->conf, cfg, &state, msg, sizeof msg) != 0) {
        snprintf(err, err_len, "%s:%d:%d: %s: %s", cfg->path ? cfg->path : "config", fc->line,
                 fc->col, fc->where ? fc->where : ops->name, msg[0] ? msg : "cannot create");
        return -1;
    }
    struct sl_filter_instance *fi = &set->instances[set->instance_count];
    fi->ops = ops;
    fi->state = state;
    fi->slot = set->instance_count++;
    return 0;
}

int sl_filter_set_build(const struct sl_config *cfg, struct sl_filter_set **out, char *err,
                        size_t err_len)
{
    struct sl_filter_set *set = calloc(1, sizeof *set);
    size_t total = cfg->default_filter_count;
    for (size_t r = 0; r < cfg->route_count; r++)
        total += cfg->routes[r].filter_count;
    *out = NULL;
    if (!set)
        goto oom;
    set->instances = calloc(total ? total : 1, sizeof *set->instances);
    set->route_chains = calloc(cfg->route_count ? cfg->route_count : 1, sizeof(*set->route_chains));
    set->route_count = cfg->route_count;
    if (!set->instances || !set->route_chains)
        goto oom;
    for (size_t i = 0; i < cfg->default_filter_count; i++)
        if (add_instance(set, cfg, &cfg->default_filters[i], err, err_len) != 0)
            goto fail;
    for (size_t r = 0; r < cfg->route_count; r++) {
        const struct sl_route_conf *rc = &cfg->routes[r];
        size_t nd = rc->skip_default_filters ? 0 : cfg->default_filter_count;
        size_t n = nd + rc->filter_count;
        struct sl_filter_chain *ch = &set->route_chains[r];
        if (n == 0)
            continue;
        ch->items = calloc(n, sizeof *ch->items);
        if (!ch->items)
            goto oom;
        for (size_t i = 0; i < nd; i++)
            ch->items[ch->count++] = set->instances[i];
        for (size_t i = 0; i < rc->filter_count; i++) {
            if (add_instance(set, cfg, &rc->filters[i], err, err_len) != 0)
                goto fail;
            ch->items[ch->count++] = set->instances[set->instance_count - 1];
        }
    }
    *out = set;
    return 0;
oom:
    snprintf(err, err_len, "out of memory building filters");
fail:
    sl_filter_set_free(set);
    return -1;
}

void sl_filter_set_free(struct sl_filter_set *set)
{
    if (!set)
        return;
    for (size_t i = 0; i < set->instance_count; i++)
        if (set->instances[i].ops->destroy)
            set->instances[i].ops->destroy(set->instances[i].state);
    for (size_t r = 0; set->route_chains && r < set->route_count; r++)
        free(set->route_chains[r].items);
    free(set->route_chains);
    free(set->instances);
    free(set);
}

int sl_filter_set_worker_init(const struct sl_filter_set *set, struct sl_worker *w, void ***wstates)
{
    void **ws = calloc(set->instance_count ? set->instance_count : 1, sizeof *ws);
    *wstates = ws;
    if (!ws)
        return -ENOMEM;
    for (size_t i = 0; i < set->instance_count; i++) {
        const struct sl_filter_instance *fi = &set->instances[i];
        if (!fi->ops->worker_init)
            continue;
        int rc = fi->ops->worker_init(fi->state, w, &ws[i]);
        if (rc < 0)
            return rc;
    }
    return 0;
}

void sl_filter_set_worker_fini(const struct sl_filter_set *set, void **wstates)
{
    if (!wstates)
        return;
    for (size_t i = 0; i < set->instance_count; i++) {
        const struct sl_filter_instance *fi = &set->instances[i];
        if (fi->ops->worker_fini && wstates[i])
            fi->ops->worker_fini(fi->state, wstates[i]);
    }
    free(wstates);
}
