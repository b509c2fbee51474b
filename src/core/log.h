#ifndef SL_CORE_LOG_H
#define SL_CORE_LOG_H

/*
 * sluice's own log (not the access log): one line per event on stderr, written with a single
 * write() so lines from several workers never interleave. Used for start-up, errors and
 * unusual events, never per request at the default level.
 */

enum sl_log_lvl { SL_LOG_LVL_ERROR = 0, SL_LOG_LVL_WARN, SL_LOG_LVL_INFO, SL_LOG_LVL_DEBUG };

/* Sets the maximum level written (default info). Safe to call before workers start. */
void sl_log_set_level(int level);

/* True when a line at `level` would be written; lets callers skip building costly context. */
_Bool sl_log_enabled(int level);

/* Writes one line: "<ISO time> <level> [w<worker>] <message>\n". */
void sl_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define SL_ERR(...) sl_log(SL_LOG_LVL_ERROR, __VA_ARGS__)
#define SL_WARN(...) sl_log(SL_LOG_LVL_WARN, __VA_ARGS__)
#define SL_INFO(...) sl_log(SL_LOG_LVL_INFO, __VA_ARGS__)
#define SL_DEBUG(...)                                                                              \
    do {                                                                                           \
        if (sl_log_enabled(SL_LOG_LVL_DEBUG))                                                      \
            sl_log(SL_LOG_LVL_DEBUG, __VA_ARGS__);                                                 \
    } while (0)

/* Id of the worker running on this thread, or -1 on the main thread (for log context). */
void sl_log_set_worker_id(int id);

#endif
