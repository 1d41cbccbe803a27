/* A task that receives a file and produces one: reads /in/a.txt and writes its content
 * reversed to /out/b.txt, then prints "wrote N bytes".
 *
 * argv[1] adds one thing to do after that:
 *   write-in      try to modify /in/a.txt and to create /in/new.txt; prints "write-in: ..."
 *                 and exits 3 when both are refused, exits 0 (wrongly) when either worked
 *   big N         also write N bytes to /out/big.bin
 *   many N        also write N small files /out/f0 ... /out/f{N-1}
 *   subdir        also create the directory /out/sub
 *   name NAME     also write a small file /out/NAME
 *
 * The exported function `reverse` (function mode) does the reversal alone and returns the
 * byte count, or -1 when /in/a.txt cannot be read, -2 when /out/b.txt cannot be written.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char buf[1 << 20];

static long reverse_file(void) {
    FILE *in = fopen("/in/a.txt", "rb");
    if (!in) {
        return -1;
    }
    size_t n = fread(buf, 1, sizeof buf, in);
    fclose(in);
    for (size_t i = 0; i < n / 2; i++) {
        char c = buf[i];
        buf[i] = buf[n - 1 - i];
        buf[n - 1 - i] = c;
    }
    FILE *out = fopen("/out/b.txt", "wb");
    if (!out) {
        return -2;
    }
    fwrite(buf, 1, n, out);
    if (fclose(out) != 0) {
        return -2;
    }
    return (long)n;
}

__attribute__((export_name("reverse"))) long reverse(void) { return reverse_file(); }

static int write_small(const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        printf("cannot write %s: %s\n", path, strerror(errno));
        return 1;
    }
    fputs("x\n", f);
    return fclose(f) != 0;
}

static int write_in(void) {
    int modified = open("/in/a.txt", O_WRONLY | O_APPEND);
    int modify_errno = errno;
    int created = open("/in/new.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int create_errno = errno;
    if (modified >= 0 || created >= 0) {
        printf("write-in: allowed (modify %d, create %d)\n", modified, created);
        return 0;
    }
    fprintf(stderr, "write-in: refused: %s; %s\n", strerror(modify_errno),
            strerror(create_errno));
    return 3;
}

static int write_big(long size) {
    FILE *f = fopen("/out/big.bin", "wb");
    if (!f) {
        return 1;
    }
    memset(buf, 'z', sizeof buf);
    while (size > 0) {
        size_t step = size < (long)sizeof buf ? (size_t)size : sizeof buf;
        fwrite(buf, 1, step, f);
        size -= (long)step;
    }
    return fclose(f) != 0;
}

int main(int argc, char **argv) {
    long n = reverse_file();
    if (n == -1) {
        printf("cannot read /in/a.txt: %s\n", strerror(errno));
        return 1;
    }
    if (n == -2) {
        printf("cannot write /out/b.txt: %s\n", strerror(errno));
        return 2;
    }
    printf("wrote %ld bytes\n", n);
    const char *what = argc > 1 ? argv[1] : "";
    const char *arg = argc > 2 ? argv[2] : "0";
    if (strcmp(what, "write-in") == 0) {
        return write_in();
    }
    if (strcmp(what, "big") == 0) {
        return write_big(atol(arg));
    }
    if (strcmp(what, "many") == 0) {
        for (long i = 0; i < atol(arg); i++) {
            char path[64];
            snprintf(path, sizeof path, "/out/f%ld", i);
            if (write_small(path)) {
                return 1;
            }
        }
        return 0;
    }
    if (strcmp(what, "subdir") == 0) {
        return mkdir("/out/sub", 0755) != 0;
    }
    if (strcmp(what, "name") == 0) {
        char path[512];
        snprintf(path, sizeof path, "/out/%s", arg);
        return write_small(path);
    }
    return 0;
}
