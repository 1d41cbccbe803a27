/* A WASI command: prints argv (one per line), $GREETING, then copies stdin to stdout,
 * writes "to-stderr" to stderr and exits with $EXIT_CODE (default 0). */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        printf("%s\n", argv[i]);
    }
    const char *greeting = getenv("GREETING");
    printf("GREETING=%s\n", greeting ? greeting : "(unset)");
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        fwrite(buf, 1, n, stdout);
    }
    fflush(stdout);
    fputs("to-stderr\n", stderr);
    const char *code = getenv("EXIT_CODE");
    return code ? atoi(code) : 0;
}
