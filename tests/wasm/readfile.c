/* Prints /data/input.txt, then tries to create /data/out.txt and reports whether it could. */
#include <stdio.h>

int main(void) {
    FILE *in = fopen("/data/input.txt", "r");
    if (!in) {
        puts("read: failed");
        return 1;
    }
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
        fwrite(buf, 1, n, stdout);
    }
    fclose(in);
    FILE *out = fopen("/data/out.txt", "w");
    if (out) {
        fputs("written", out);
        fclose(out);
        puts("write: ok");
    } else {
        puts("write: failed");
    }
    return 0;
}
