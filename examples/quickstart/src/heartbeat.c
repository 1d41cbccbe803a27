/* A daemon: prints a numbered heartbeat line every $INTERVAL seconds (default 1), forever.
 * The proplet keeps it running and restarts it if it exits. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(void) {
    const char *text = getenv("INTERVAL");
    int interval = text ? atoi(text) : 1;
    if (interval < 1) {
        interval = 1;
    }
    for (unsigned long beat = 1;; beat++) {
        printf("heartbeat %lu\n", beat);
        fflush(stdout);
        sleep((unsigned)interval);
    }
}
