/* Runs every suite; prints each failure and one closing line "N passed, N failed". */
#include <stdlib.h>

#include "harness.h"

static int passed, failed, current_failures;
static const char *current;

void pb_check_failed(const char *file, int line, const char *what)
{
    if (current_failures++ == 0)
        printf("FAIL %s\n", current);
    printf("  %s:%d: %s\n", file, line, what);
}

static void detail(const char *file, int line, const char *what)
{
    pb_check_failed(file, line, what);
}

void pb_check_int(const char *file, int line, const char *ea, const char *eb, long long a,
                  long long b)
{
    if (a == b)
        return;
    detail(file, line, ea);
    printf("    %s: got %lld, expected %s = %lld\n", ea, a, eb, b);
}

void pb_check_str(const char *file, int line, const char *ea, const char *eb, const char *a,
                  const char *b)
{
    if (a != NULL && b != NULL && strcmp(a, b) == 0)
        return;
    detail(file, line, ea);
    printf("    got:      %s\n    expected: %s (%s)\n", a ? a : "(null)", b ? b : "(null)", eb);
}

void pb_check_contains(const char *file, int line, const char *ehay, const char *hay,
                       const char *needle)
{
    if (hay != NULL && strstr(hay, needle) != NULL)
        return;
    detail(file, line, ehay);
    printf("    missing:  %s\n    in:       %s\n", needle, hay ? hay : "(null)");
}

void pb_run_test(const char *name, void (*fn)(void))
{
    current = name;
    current_failures = 0;
    fn();
    if (current_failures == 0)
        passed++;
    else
        failed++;
}

int main(void)
{
    suite_sha256();
    suite_json();
    suite_encode();
    suite_converge();
    suite_artifact();
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
