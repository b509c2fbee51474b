#ifndef SL_CONFIG_ERRORS_H
#define SL_CONFIG_ERRORS_H

#include <stdarg.h>
#include <stddef.h>

#include "config/config.h"

/*
 * Appends one error to `errs`, copying `path` and the formatted message. Returns 0, or -ENOMEM
 * when the error could not be recorded (the caller still fails the load).
 */
int sl__config_errors_add(struct sl_config_errors *errs, int line, int col, const char *path,
                          const char *fmt, ...) __attribute__((format(printf, 5, 6)));

int sl__config_errors_vadd(struct sl_config_errors *errs, int line, int col, const char *path,
                           const char *fmt, va_list ap) __attribute__((format(printf, 5, 0)));

/* Orders errors by position, keeping insertion order for equal positions (stable). */
void sl__config_errors_sort(struct sl_config_errors *errs);

/*
 * Writes `s[0..len)` into `buf` as a double-quoted string with control bytes escaped and long
 * values shortened, so user input cannot break an error line. Returns `buf`.
 */
const char *sl__config_quote(char *buf, size_t cap, const char *s, size_t len);

#endif
