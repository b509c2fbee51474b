#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

/* Parses a non-negative decimal argument; exits with a message when it is not one. */
static inline int arg_int(const char *s, const char *what)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > 1000000000L) {
        fprintf(stderr, "bad %s: %s\n", what, s);
        exit(2);
    }
    return (int)v;
}

#endif
