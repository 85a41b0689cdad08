/* SPDX-License-Identifier: MIT */
/*
 * macro: small helpers every module uses: scope-bound cleanup in the style
 * of systemd, array sizes, ownership hand-over. No state, no I/O.
 */
#pragma once

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))

/* On every function whose failure must stop what it guards (persistence,
 * the bootloader, installers): ignoring the result is a compile error. */
#define _warn_unused_result_ __attribute__((warn_unused_result))

/* An argument check at a module's entry, as systemd's assert_return(): a
 * caller's programming error becomes an error return instead of a crash
 * in the field. Bad input from the network or a file is never checked
 * this way: that is an expected event with its own message. */
#define assert_return(expr, r)                  \
        do {                                    \
                if (__builtin_expect(!(expr), 0)) \
                        return (r);             \
        } while (0)

static inline void freep(void *p) {
        free(*(void **) p);
}

static inline void closep(int *fd) {
        if (*fd >= 0)
                close(*fd);
}

static inline void fclosep(FILE **f) {
        if (*f)
                fclose(*f);
}

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _cleanup_free_ _cleanup_(freep)
#define _cleanup_close_ _cleanup_(closep)
#define _cleanup_fclose_ _cleanup_(fclosep)

/* Hands ownership of *pp to the caller: returns it and leaves NULL behind,
 * so the cleanup attribute on the source does nothing. */
static inline void *take_ptr(void *pp) {
        void **p = pp;
        void *r = *p;
        *p = NULL;
        return r;
}

static inline int take_fd(int *fd) {
        int r = *fd;
        *fd = -1;
        return r;
}
