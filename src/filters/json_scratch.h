#ifndef SL_FILTERS_JSON_SCRATCH_H
#define SL_FILTERS_JSON_SCRATCH_H

/*
 * jansson allocates every JSON value with malloc. Token headers and claims are parsed on the
 * request path (on a cache miss, which is also what an attacker's fresh tokens cause), where
 * nothing may malloc. Between sl_json_scratch_begin() and _end() on a thread, jansson's
 * allocations come from a per-thread bump buffer instead, all released at _end(); anything
 * larger than the buffer, and every other use of jansson (key sets fetched in the
 * background), still goes to malloc.
 */

/* Routes jansson through the scratch allocator. Once per process, before other threads use
 * jansson (sl_filters_register_config calls it); later calls do nothing. */
void sl_json_scratch_install(void);

/* Opens a scratch scope on this thread (not nestable). */
void sl_json_scratch_begin(void);

/* Closes it: every value parsed inside must have been released (json_decref) by now. */
void sl_json_scratch_end(void);

#endif
