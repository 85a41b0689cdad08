/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bundle_tool.h"
#include "config.h"
#include "config_check.h"
#include "daemon.h"
#include "log.h"
#include "status.h"

static void help(void) {
        printf("Usage: otad [OPTIONS]\n"
               "       otad status [--json] [-c PATH]\n"
               "       otad bundle create|inspect|verify ...   (see otad-bundle(1))\n"
               "\n"
               "Over-the-air update daemon for AWS IoT Jobs (see otad(8)).\n"
               "\n"
               "  status              show the slots, the job in progress and the last result\n"
               "      --json          ... as JSON\n"
               "  -c, --config PATH   configuration file (default " OTAD_DEFAULT_CONFIG ")\n"
               "      --check-config  validate the configuration and referenced files, then exit\n"
               "  -v, --verbose       log at debug level, whatever [log] level says\n"
               "      --version       print the version and exit\n"
               "  -h, --help          show this help\n");
}

/* otad --check-config: config_load() has checked the syntax; the rest is
 * config_check()'s list. Ends with one line on stdout for a person or a
 * script; problems went to stderr, each naming its file. */
static int check_config(const char *config_path, const struct otad_config *config) {
        unsigned warnings = 0;
        int r;

        r = config_check(config, &warnings);
        if (r < 0)
                return r;
        if (warnings > 0)
                printf("%s: configuration OK, %u warning%s\n", config_path, warnings, warnings == 1 ? "" : "s");
        else
                printf("%s: configuration OK\n", config_path);
        return 0;
}

int main(int argc, char *argv[]) {
        enum { ARG_CHECK_CONFIG = 0x100, ARG_VERSION, ARG_JSON };
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "check-config", no_argument, NULL, ARG_CHECK_CONFIG },
                { "verbose", no_argument, NULL, 'v' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "json", no_argument, NULL, ARG_JSON },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        const char *config_path = OTAD_DEFAULT_CONFIG;
        bool check_only = false, verbose = false, json = false, show_status = false;
        struct otad_config *config = NULL;
        struct otad *otad = NULL;
        int c, r;

        /* A tool of its own, run on the build host: its options are its own. */
        if (argc >= 2 && strcmp(argv[1], "bundle") == 0)
                return bundle_tool_main(argc - 1, argv + 1);

        while ((c = getopt_long(argc, argv, "c:vh", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        config_path = optarg;
                        break;
                case ARG_CHECK_CONFIG:
                        check_only = true;
                        break;
                case 'v':
                        verbose = true;
                        break;
                case ARG_JSON:
                        json = true;
                        break;
                case ARG_VERSION:
                        printf("otad %s\n", OTAD_VERSION);
                        return EXIT_SUCCESS;
                case 'h':
                        help();
                        return EXIT_SUCCESS;
                default:
                        return EXIT_FAILURE;
                }
        if (optind < argc && strcmp(argv[optind], "status") == 0) {
                show_status = true;
                optind++;
        }
        if (json && !show_status) {
                fprintf(stderr, "otad: --json goes with 'otad status'\n");
                return EXIT_FAILURE;
        }
        if (optind < argc) {
                fprintf(stderr, "otad: unexpected argument '%s' (see otad --help)\n", argv[optind]);
                return EXIT_FAILURE;
        }

        log_open();
        if (verbose)
                log_set_max_level(LOG_DEBUG);

        r = config_load(config_path, &config);
        if (r < 0)
                return EXIT_FAILURE;
        if (!verbose)
                log_set_max_level(config->log.level);

        if (show_status) {
                r = status_print(config, json);
                config_free(config);
                return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
        }

        if (check_only) {
                r = check_config(config_path, config);
                config_free(config);
                return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
        }

        r = otad_new(config, &otad);
        if (r >= 0)
                r = otad_run(otad);
        otad_free(otad);
        config_free(config);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
