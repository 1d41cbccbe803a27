/* A WASI command: prints $GREETING and its arguments, then counts the lines, words and bytes
 * of stdin, like `wc`. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *greeting = getenv("GREETING");
    printf("%s", greeting ? greeting : "Hello");
    for (int i = 1; i < argc; i++) {
        printf("%s%s", i == 1 ? ", " : " ", argv[i]);
    }
    printf("!\n");
    long lines = 0, words = 0, bytes = 0;
    int in_word = 0;
    int c;
    while ((c = getchar()) != EOF) {
        bytes++;
        if (c == '\n') {
            lines++;
        }
        if (isspace(c)) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    printf("%ld lines, %ld words, %ld bytes\n", lines, words, bytes);
    return 0;
}
