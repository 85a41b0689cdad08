/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "worker.h"

struct worker {
        pthread_t thread;
        int efd;                 /* the thread writes 1 when fn returned */
        sd_event_source *source;
        worker_fn fn;
        void *arg;
        worker_done_fn done;
        void *userdata;
        atomic_bool cancelled;
        int result;              /* written by the thread before efd, read after */
};

static void *run(void *p) {
        struct worker *w = p;
        uint64_t one = 1;

        w->result = w->fn(w, w->arg);
        /* The eventfd write publishes result: the loop reads it only after
         * it saw the event (write/read are full barriers for this). */
        while (write(w->efd, &one, sizeof(one)) < 0 && errno == EINTR)
                ;
        return NULL;
}

static void worker_destroy(struct worker *w) {
        sd_event_source_disable_unref(w->source);
        if (w->efd >= 0)
                close(w->efd);
        free(w);
}

static int on_done(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct worker *w = userdata;
        worker_done_fn done = w->done;
        void *ud = w->userdata;
        int result;

        pthread_join(w->thread, NULL);
        result = w->result;
        worker_destroy(w);
        done(result, ud);
        return 0;
}

int worker_start(sd_event *event, worker_fn fn, void *arg, worker_done_fn done, void *userdata,
                 struct worker **ret) {
        struct worker *w;
        sigset_t all, old;
        int r;

        assert_return(event && fn && done && ret, -EINVAL);
        w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->fn = fn;
        w->arg = arg;
        w->done = done;
        w->userdata = userdata;
        atomic_init(&w->cancelled, false);
        w->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (w->efd < 0) {
                r = -errno;
                goto fail;
        }
        r = sd_event_add_io(event, &w->source, w->efd, EPOLLIN, on_done, w);
        if (r < 0)
                goto fail;
        /* The thread takes no signal: they belong to the loop's signalfd. */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        r = -pthread_create(&w->thread, NULL, run, w);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r < 0)
                goto fail;
        *ret = w;
        return 0;
fail:
        worker_destroy(w);
        return r;
}

bool worker_cancelled(const struct worker *w) {
        return atomic_load(&((struct worker *) w)->cancelled);
}

void worker_free(struct worker *w) {
        if (!w)
                return;
        atomic_store(&w->cancelled, true);
        pthread_join(w->thread, NULL);
        worker_destroy(w);
}
