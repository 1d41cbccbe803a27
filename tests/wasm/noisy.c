/* Writes 1 MiB of 'x' to stdout, in 64 KiB writes, to exercise bounded output capture. */
#include <stdio.h>
#include <string.h>

int main(void) {
    static char chunk[65536];
    memset(chunk, 'x', sizeof chunk);
    for (int i = 0; i < 16; i++) {
        fwrite(chunk, 1, sizeof chunk, stdout);
    }
    fputs("done\n", stderr);
    return 0;
}
