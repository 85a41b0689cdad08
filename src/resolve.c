/* SPDX-License-Identifier: MIT */
/*
 * getaddrinfo() can wait for DNS servers for tens of seconds, longer than
 * the watchdog allows the loop to stand still, so it runs in a detached
 * thread. The thread and the loop share one reference-counted answer: a
 * query cancelled while the thread still waits is freed by whichever side
 * lets go last, so cancelling never blocks either.
 */
#include <assert.h>
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "macro.h"
#include "resolve.h"

#define ADDRESSES_MAX 16

struct answer {
        atomic_int refs;
        char *host;
        int eventfd;
        int error;
        int sys_errno;
        struct addrinfo *result;
};

struct resolve_query {
        struct answer *answer;
        sd_event_source *source;
        resolve_done_fn done;
        void *userdata;
};

static void answer_unref(struct answer *a) {
        if (!a || atomic_fetch_sub(&a->refs, 1) != 1)
                return;
        if (a->result)
                freeaddrinfo(a->result);
        if (a->eventfd >= 0)
                close(a->eventfd);
        free(a->host);
        free(a);
}

static void *resolve_thread(void *p) {
        struct answer *a = p;
        const struct addrinfo hints = {
                .ai_family = AF_UNSPEC,
                .ai_socktype = SOCK_STREAM,
                /* No AI_ADDRCONFIG: it hides ::1 and 127.0.0.1 from a host
                 * with only loopback addresses of that family, and a
                 * family that does not work is tried and passed over anyway. */
        };
        uint64_t one = 1;

        a->error = getaddrinfo(a->host, NULL, &hints, &a->result);
        a->sys_errno = a->error == EAI_SYSTEM ? errno : 0;
        (void) !write(a->eventfd, &one, sizeof(one));
        answer_unref(a);
        return NULL;
}

void resolve_cancel(struct resolve_query *q) {
        if (!q)
                return;
        sd_event_source_disable_unref(q->source);
        answer_unref(q->answer);
        free(q);
}

static int on_answer(sd_event_source *source, int fd, uint32_t revents, void *userdata) {
        struct resolve_query *q = userdata;
        struct answer *a = q->answer;
        resolve_done_fn done = q->done;
        void *done_userdata = q->userdata;
        int error = a->error, sys_errno = a->sys_errno;
        char *addresses[ADDRESSES_MAX];
        char buf[ADDRESSES_MAX][NI_MAXHOST];
        size_t n = 0;

        for (struct addrinfo *ai = error ? NULL : a->result; ai && n < ADDRESSES_MAX; ai = ai->ai_next) {
                bool seen = false;

                if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
                    getnameinfo(ai->ai_addr, ai->ai_addrlen, buf[n], sizeof(buf[n]), NULL, 0, NI_NUMERICHOST) != 0)
                        continue;
                for (size_t k = 0; k < n; k++)
                        seen = seen || strcmp(addresses[k], buf[n]) == 0;
                if (!seen) {
                        addresses[n] = buf[n];
                        n++;
                }
        }
        /* The query is over before its owner hears of it. */
        resolve_cancel(q);
        if (!error && n == 0)
                error = EAI_NODATA;
        done(error, sys_errno, addresses, error ? 0 : n, done_userdata);
        return 0;
}

int resolve_start(sd_event *event, const char *host, resolve_done_fn done, void *userdata,
                  struct resolve_query **ret) {
        struct resolve_query *q;
        struct answer *a;
        pthread_attr_t attr;
        pthread_t thread;
        sigset_t all, old;
        int r;

        assert(event);
        assert(host);
        assert(done);
        assert(ret);

        q = calloc(1, sizeof(*q));
        a = calloc(1, sizeof(*a));
        if (!q || !a) {
                free(q);
                free(a);
                return -ENOMEM;
        }
        atomic_init(&a->refs, 1);
        a->eventfd = -1;
        q->answer = a;
        q->done = done;
        q->userdata = userdata;
        a->host = strdup(host);
        if (!a->host) {
                r = -ENOMEM;
                goto fail;
        }
        a->eventfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (a->eventfd < 0) {
                r = -errno;
                goto fail;
        }
        r = sd_event_add_io(event, &q->source, a->eventfd, EPOLLIN, on_answer, q);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_description(q->source, "resolve");

        r = -pthread_attr_init(&attr);
        if (r < 0)
                goto fail;
        (void) pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* Signals belong to the loop's signalfd, never to this thread. */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        atomic_fetch_add(&a->refs, 1);
        r = -pthread_create(&thread, &attr, resolve_thread, a);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
        if (r < 0) {
                atomic_fetch_sub(&a->refs, 1);
                goto fail;
        }
        *ret = q;
        return 0;
fail:
        resolve_cancel(q);
        return r;
}
