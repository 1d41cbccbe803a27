/* A minimal test harness: CHECK macros that record failures, and a runner that counts tests. */
#ifndef PB_HARNESS_H
#define PB_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

void pb_check_failed(const char *file, int line, const char *what);
void pb_run_test(const char *name, void (*fn)(void));

#define RUN(fn) pb_run_test(#fn, fn)
#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond))                                                                          \
            pb_check_failed(__FILE__, __LINE__, #cond);                                       \
    } while (0)
#define CHECK_INT(a, b) pb_check_int(__FILE__, __LINE__, #a, #b, (long long)(a), (long long)(b))
#define CHECK_STR(a, b) pb_check_str(__FILE__, __LINE__, #a, #b, (a), (b))
#define CHECK_CONTAINS(hay, needle) pb_check_contains(__FILE__, __LINE__, #hay, (hay), (needle))

void pb_check_int(const char *file, int line, const char *ea, const char *eb, long long a,
                  long long b);
void pb_check_str(const char *file, int line, const char *ea, const char *eb, const char *a,
                  const char *b);
void pb_check_contains(const char *file, int line, const char *ehay, const char *hay,
                       const char *needle);

void suite_sha256(void);
void suite_json(void);
void suite_encode(void);
void suite_converge(void);
void suite_artifact(void);

#endif
