/* Sleeps, which blocks in the host (poll_oneoff) rather than in Wasm code.
 * With an argument N: sleeps N milliseconds once, prints "awake" and exits 0.
 * Without: sleeps forever in one-second naps, for stop and timeout. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc > 1) {
        usleep((useconds_t)atoi(argv[1]) * 1000);
        puts("awake");
        return 0;
    }
    for (;;) {
        sleep(1);
    }
}
