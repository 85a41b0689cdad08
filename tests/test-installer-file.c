/* SPDX-License-Identifier: MIT */
/* Unit tests of the file installer: partial file, out-of-order blocks,
 * resume, atomic activation, abort, and a job id that tries to escape. */
#include <dirent.h>

#include "installer-test-util.h"
#include "installer.h"
#include "otad.h"

#define IMAGE_SIZE (300 * 1024 + 17)
#define BLOCK      4096

static char *dir;

static int count_entries(const char *path) {
        DIR *d = opendir(path);
        struct dirent *de;
        int n = 0;

        if (!d)
                return -1;
        while ((de = readdir(d)))
                if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
                        n++;
        closedir(d);
        return n;
}

static int write_blocks(struct installer *in, const unsigned char *image, size_t from, size_t to, bool reverse) {
        size_t nblocks = (IMAGE_SIZE + BLOCK - 1) / BLOCK;

        for (size_t k = 0; k < nblocks; k++) {
                size_t i = reverse ? nblocks - 1 - k : k;
                size_t off = i * BLOCK, len = off + BLOCK > IMAGE_SIZE ? IMAGE_SIZE - off : BLOCK;
                int r;

                if (i < from || i >= to)
                        continue;
                r = in->ops->write(in, off, image + off, len);
                if (r < 0)
                        return r;
        }
        return 0;
}

static bool file_equals(const char *path, const unsigned char *data, size_t len) {
        char *got = NULL;
        size_t size = 0;
        bool same;

        if (read_file_full(path, len + 1, &got, &size) < 0)
                return false;
        same = size == len && memcmp(got, data, len) == 0;
        free(got);
        return same;
}

int main(void) {
        static unsigned char image[IMAGE_SIZE], back[IMAGE_SIZE];
        struct otad_config *c;
        struct otad o = { 0 };
        struct installer *in = NULL;
        char *out, *final, *partial, *extra;
        struct stat st;

        dir = make_scratch("test-installer-file");
        out = xprintf("%s/payload", dir);
        final = xprintf("%s/app", out);
        partial = xprintf("%s/.app-job-1.otad-partial", out);
        extra = xprintf("[target.app]\ntype = file\ndirectory = %s\n", out);
        c = load_config(dir, extra);
        tap_ok(c != NULL, "config loads");
        if (!c)
                return tap_done();
        o.config = c;
        fill_pattern(image, sizeof(image), 1);

        /* a whole job, blocks in reverse order */
        tap_is_int(installer_new(&o, &c->targets[0], "job-1", &in), 0, "installer_new(file)");
        tap_is_str(in->ops->name, "file", "the file backend");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), 0, "begin creates the directory and the partial file");
        tap_ok(stat(partial, &st) == 0 && st.st_size == IMAGE_SIZE, "partial file .app-job-1.otad-partial holds %d bytes", IMAGE_SIZE);
        tap_is_int(write_blocks(in, image, 0, SIZE_MAX, true), 0, "blocks written in reverse order");
        tap_is_int(in->ops->write(in, IMAGE_SIZE - 10, image, 11), -ERANGE, "a write beyond the size: -ERANGE");
        tap_is_int(in->ops->sync(in), 0, "sync");
        tap_is_int(in->ops->finish(in), 0, "finish");
        tap_is_int(in->ops->read(in, 0, back, IMAGE_SIZE), 0, "read back");
        tap_ok(memcmp(back, image, IMAGE_SIZE) == 0, "read-back equals the image");
        tap_ok(stat(final, &st) < 0, "nothing at the final path before activate");
        tap_is_int(in->ops->activate(in), 0, "activate returns 0 (no reboot)");
        tap_ok(file_equals(final, image, IMAGE_SIZE), "the final file holds the image");
        tap_ok(stat(partial, &st) < 0, "the partial file is gone");
        installer_free(in);
        in = NULL;

        /* resume: half a job, the daemon goes away, the rest after restart */
        fill_pattern(image, sizeof(image), 2);
        partial = (free(partial), xprintf("%s/.app-job-2.otad-partial", out));
        tap_is_int(installer_new(&o, &c->targets[0], "job-2", &in), 0, "installer_new for job-2");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, false), 0, "begin");
        tap_is_int(write_blocks(in, image, 0, 40, false), 0, "first 40 blocks");
        tap_is_int(in->ops->sync(in), 0, "sync");
        installer_free(in); /* no abort: a stop, not a cancel */
        tap_ok(stat(partial, &st) == 0, "free keeps the partial file for a resume");
        tap_is_int(installer_new(&o, &c->targets[0], "job-2", &in), 0, "installer_new after restart");
        tap_is_int(in->ops->begin(in, IMAGE_SIZE, true), 0, "begin(resume)");
        tap_is_int(in->ops->read(in, 0, back, 40 * BLOCK), 0, "read the first 40 blocks");
        tap_ok(memcmp(back, image, 40 * BLOCK) == 0, "resume kept the blocks written before");
        tap_is_int(write_blocks(in, image, 40, SIZE_MAX, false), 0, "the remaining blocks");
        tap_is_int(in->ops->finish(in), 0, "finish");
        tap_is_int(in->ops->activate(in), 0, "activate");
        tap_ok(file_equals(final, image, IMAGE_SIZE), "the final file holds the second image");
        installer_free(in);
        in = NULL;

        /* a new start (not a resume) drops stale bytes */
        tap_is_int(installer_new(&o, &c->targets[0], "job-3", &in), 0, "installer_new for job-3");
        tap_is_int(in->ops->begin(in, 100, false), 0, "begin 100 bytes");
        tap_is_int(in->ops->write(in, 0, "x", 1), 0, "one byte");
        installer_free(in);
        tap_is_int(installer_new(&o, &c->targets[0], "job-3", &in), 0, "installer_new again");
        tap_is_int(in->ops->begin(in, 100, false), 0, "begin without resume");
        tap_is_int(in->ops->read(in, 0, back, 1), 0, "read");
        tap_ok(back[0] == 0, "begin without resume starts empty");
        in->ops->abort(in);
        tap_is_int(count_entries(out), 1, "abort removed the partial file; only the installed file is left");
        installer_free(in);
        in = NULL;

        /* a job id that tries to name another directory stays inside */
        tap_is_int(installer_new(&o, &c->targets[0], "../../escape", &in), 0, "installer_new with a hostile job id");
        tap_is_int(in->ops->begin(in, 10, false), 0, "begin");
        {
                char *inside = xprintf("%s/.app-.._.._escape.otad-partial", out);
                char *outside = xprintf("%s/escape.otad-partial", dir);

                tap_ok(stat(inside, &st) == 0, "the partial file is %s", inside);
                tap_ok(stat(outside, &st) < 0, "nothing was created outside the directory");
                free(inside);
                free(outside);
        }
        in->ops->abort(in);
        installer_free(in);

        config_free(c);
        remove_scratch(dir);
        free(dir);
        free(out);
        free(final);
        free(partial);
        free(extra);
        return tap_done();
}
