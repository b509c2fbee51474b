#include "obs/status_page.h"

static const char page[] = "<!doctype html><title>sluice</title>";

const char *sl_status_page(size_t *len)
{
    *len = sizeof page - 1;
    return page;
}

const char *sl_status_page_csp(void)
{
    return "default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; "
           "script-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; "
           "form-action 'none'; frame-ancestors 'none'";
}
