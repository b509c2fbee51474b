/* libFuzzer target: arbitrary bytes through the whole loader (YAML tree, schema, name
 * resolution, snapshot), then free everything so LeakSanitizer sees every error path. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "config/config.h"
#include "filters/filter_set.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* No DNS: lookups are slow, flaky and would make runs depend on the network. */
    sl_config_set_resolve(false);
    /* Filter schemas (jwt, api_key, rate_limit) are part of what the loader checks. */
    sl_filters_register_config();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct sl_config *cfg = NULL;
    struct sl_config_errors errs;
    int rc = sl_config_load_string("fuzz.yaml", (const char *)data, size, &cfg, &errs);
    if (rc == 0) {
        if (!cfg || errs.count != 0)
            __builtin_trap();
        sl_config_free(cfg);
    } else {
        if (cfg || errs.count == 0)
            __builtin_trap();
        FILE *null = fopen("/dev/null", "w");
        if (null) {
            sl_config_errors_print(&errs, null);
            fclose(null);
        }
    }
    sl_config_errors_dispose(&errs);
    return 0;
}
