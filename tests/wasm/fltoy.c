/* A stand-in federated trainer whose update is known in advance, for the coordinator's tests.
 *
 * Reads /in/model.npy (float32, as numpy writes it) and writes /out/update.npy with every value
 * plus 1, then prints {"samples": N, "loss": L}. N comes from /data/samples (default 10), and
 * /data/fault, when present, makes this client misbehave:
 *   nan    the update holds a NaN          shape  the update has one value too many
 *   norm   every value plus 1000           trap   the module traps (unreachable)
 *   fail   exits with code 1               slow   sleeps 1.5 s before answering
 *   none   writes no update
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long read_all(const char *path, char *buf, long cap) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    long n = (long)fread(buf, 1, (size_t)cap, f);
    fclose(f);
    return n;
}

static char model[1 << 22];

int main(void) {
    char fault[32] = {0};
    char text[32] = {0};
    long samples = 10;
    if (read_all("/data/samples", text, sizeof text - 1) > 0) samples = atol(text);
    if (read_all("/data/fault", fault, sizeof fault - 1) > 0) {
        char *end = strpbrk(fault, "\r\n ");
        if (end) *end = 0;
    }
    long size = read_all("/in/model.npy", model, sizeof model);
    if (size < 10 || memcmp(model, "\x93NUMPY", 6) != 0) {
        fprintf(stderr, "fltoy: cannot read /in/model.npy\n");
        return 2;
    }
    long header = 10 + (long)(unsigned char)model[8] + 256L * (unsigned char)model[9];
    long count = (size - header) / 4;
    float *values = (float *)(model + header);
    if (strcmp(fault, "slow") == 0) usleep(1500 * 1000);
    if (strcmp(fault, "trap") == 0) __builtin_trap();
    if (strcmp(fault, "fail") == 0) {
        fprintf(stderr, "fltoy: failing on purpose\n");
        return 1;
    }
    for (long i = 0; i < count; i++) values[i] += strcmp(fault, "norm") == 0 ? 1000.0f : 1.0f;
    if (strcmp(fault, "nan") == 0 && count > 0) values[0] = NAN;
    if (strcmp(fault, "none") != 0) {
        FILE *out = fopen("/out/update.npy", "wb");
        if (!out) {
            fprintf(stderr, "fltoy: cannot write /out/update.npy\n");
            return 1;
        }
        if (strcmp(fault, "shape") == 0) {
            /* The same header with one more value: the shape text changes length, so rebuild. */
            char head[128];
            int n = snprintf(head, sizeof head,
                             "{'descr': '<f4', 'fortran_order': False, 'shape': (%ld,), }",
                             count + 1);
            int total = 10 + n + 1;
            int pad = (64 - total % 64) % 64;
            unsigned short len = (unsigned short)(n + pad + 1);
            fwrite("\x93NUMPY\x01\x00", 1, 8, out);
            fputc(len & 0xff, out);
            fputc(len >> 8, out);
            fwrite(head, 1, (size_t)n, out);
            for (int i = 0; i < pad; i++) fputc(' ', out);
            fputc('\n', out);
            fwrite(values, 4, (size_t)count, out);
            float extra = 0.0f;
            fwrite(&extra, 4, 1, out);
        } else {
            fwrite(model, 1, (size_t)size, out);
        }
        fclose(out);
    }
    printf("{\"samples\": %ld, \"loss\": %.3f}\n", samples, 1.0 / (double)samples);
    return 0;
}
