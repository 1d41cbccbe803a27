/* The .npy format: a magic string, a version, a header length, then a Python dict literal such
 * as {'descr': '<f4', 'fortran_order': False, 'shape': (650,), } padded with spaces and ending in
 * a newline, then the raw array data. The dict is parsed as a small grammar: exactly the three
 * keys, each once, in any order; strings, True/False and a tuple of integers as values. */
#include "npy.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char MAGIC[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};
#define MAX_FILE_BYTES ((size_t)1 << 30)
#define MAX_TOKEN 32

static int fail(char *err, size_t errlen, int code, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(err, errlen, fmt, args);
    va_end(args);
    return code;
}

const char *npy_dtype_name(npy_dtype dtype) {
    switch (dtype) {
    case NPY_F4:
        return "<f4";
    case NPY_I4:
        return "<i4";
    case NPY_I8:
        return "<i8";
    }
    return "?";
}

static size_t itemsize(npy_dtype dtype) { return dtype == NPY_I8 ? 8 : 4; }

/* Reads the whole file; a regular file of a bounded size is expected. */
static int slurp(const char *path, unsigned char **bytes, size_t *size, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return fail(err, errlen, NPY_EIO, "cannot open: %s", strerror(errno));
    size_t cap = 1 << 16, len = 0;
    unsigned char *buf = malloc(cap);
    for (;;) {
        if (!buf) {
            fclose(f);
            return fail(err, errlen, NPY_EIO, "out of memory");
        }
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap)
            break;
        if (cap >= MAX_FILE_BYTES) {
            free(buf);
            fclose(f);
            return fail(err, errlen, NPY_EFORMAT, "larger than %zu bytes", MAX_FILE_BYTES);
        }
        cap *= 2;
        unsigned char *grown = realloc(buf, cap);
        if (!grown)
            free(buf);
        buf = grown;
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        free(buf);
        return fail(err, errlen, NPY_EIO, "read error");
    }
    *bytes = buf;
    *size = len;
    return NPY_OK;
}

/* --- the header dict ------------------------------------------------------------------------ */

typedef struct {
    const char *p, *end;
} cursor;

static void skip_space(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int take(cursor *c, char ch) {
    skip_space(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

/* A quoted string without escapes, at most MAX_TOKEN - 1 characters. */
static int string(cursor *c, char *out) {
    skip_space(c);
    if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
        return 0;
    char quote = *c->p++;
    size_t n = 0;
    while (c->p < c->end && *c->p != quote) {
        if (*c->p == '\\' || n + 1 >= MAX_TOKEN)
            return 0;
        out[n++] = *c->p++;
    }
    if (c->p >= c->end)
        return 0;
    c->p++;
    out[n] = '\0';
    return 1;
}

static int word(cursor *c, const char *w) {
    skip_space(c);
    size_t n = strlen(w);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

static int integer(cursor *c, uint64_t *out) {
    skip_space(c);
    uint64_t v = 0;
    const char *start = c->p;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        unsigned digit = (unsigned)(*c->p - '0');
        if (v > (UINT64_MAX - digit) / 10)
            return 0;
        v = v * 10 + digit;
        c->p++;
    }
    *out = v;
    return c->p > start;
}

/* (), (n,), (a, b) or (a, b,): up to NPY_MAX_DIMS non-negative integers. */
static int shape(cursor *c, npy_array *a) {
    if (!take(c, '('))
        return 0;
    a->ndim = 0;
    if (take(c, ')'))
        return 1;
    for (;;) {
        if (a->ndim == NPY_MAX_DIMS || !integer(c, &a->shape[a->ndim]))
            return 0;
        a->ndim++;
        if (take(c, ')'))
            return 1;
        if (!take(c, ','))
            return 0;
        if (take(c, ')'))
            return 1;
    }
}

static int parse_header(const char *text, size_t len, npy_array *a, char *err, size_t errlen) {
    cursor c = {text, text + len};
    int seen_descr = 0, seen_order = 0, seen_shape = 0;
    char key[MAX_TOKEN], descr[MAX_TOKEN];
    if (!take(&c, '{'))
        return fail(err, errlen, NPY_EFORMAT, "header is not a dict");
    while (!take(&c, '}')) {
        if (!string(&c, key) || !take(&c, ':'))
            return fail(err, errlen, NPY_EFORMAT, "malformed header dict");
        if (strcmp(key, "descr") == 0 && !seen_descr) {
            seen_descr = 1;
            if (!string(&c, descr))
                return fail(err, errlen, NPY_EFORMAT, "'descr' is not a simple dtype string");
            if (strcmp(descr, "<f4") == 0)
                a->dtype = NPY_F4;
            else if (strcmp(descr, "<i4") == 0)
                a->dtype = NPY_I4;
            else if (strcmp(descr, "<i8") == 0)
                a->dtype = NPY_I8;
            else
                return fail(err, errlen, NPY_EFORMAT,
                            "unsupported dtype '%s' (accepted: '<f4', '<i4', '<i8')", descr);
        } else if (strcmp(key, "fortran_order") == 0 && !seen_order) {
            seen_order = 1;
            if (word(&c, "True"))
                return fail(err, errlen, NPY_EFORMAT, "Fortran order is not supported");
            if (!word(&c, "False"))
                return fail(err, errlen, NPY_EFORMAT, "'fortran_order' is not True or False");
        } else if (strcmp(key, "shape") == 0 && !seen_shape) {
            seen_shape = 1;
            if (!shape(&c, a))
                return fail(err, errlen, NPY_EFORMAT, "'shape' is not a tuple of integers");
        } else {
            return fail(err, errlen, NPY_EFORMAT, "unexpected or repeated header key '%s'", key);
        }
        if (take(&c, '}'))
            break;
        if (!take(&c, ','))
            return fail(err, errlen, NPY_EFORMAT, "malformed header dict");
    }
    skip_space(&c);
    if (c.p != c.end)
        return fail(err, errlen, NPY_EFORMAT, "trailing bytes after the header dict");
    if (!(seen_descr && seen_order && seen_shape))
        return fail(err, errlen, NPY_EFORMAT, "header lacks 'descr', 'fortran_order' or 'shape'");
    return NPY_OK;
}

/* --- reading and writing -------------------------------------------------------------------- */

int npy_read(const char *path, npy_array *out, char *err, size_t errlen) {
    unsigned char *bytes;
    size_t size;
    memset(out, 0, sizeof *out);
    int rc = slurp(path, &bytes, &size, err, errlen);
    if (rc != NPY_OK)
        return rc;
    size_t prefix, hlen;
    if (size < 10 || memcmp(bytes, MAGIC, sizeof MAGIC) != 0) {
        rc = fail(err, errlen, NPY_EFORMAT, "not a .npy file (bad magic)");
        goto done;
    }
    if (bytes[6] == 1 && bytes[7] == 0) {
        prefix = 10;
        hlen = (size_t)bytes[8] | (size_t)bytes[9] << 8;
    } else if (bytes[6] == 2 && bytes[7] == 0 && size >= 12) {
        prefix = 12;
        hlen = (size_t)bytes[8] | (size_t)bytes[9] << 8 | (size_t)bytes[10] << 16 |
               (size_t)bytes[11] << 24;
    } else {
        rc = fail(err, errlen, NPY_EFORMAT, "unsupported .npy version %u.%u (accepted: 1.0, 2.0)",
                  bytes[6], bytes[7]);
        goto done;
    }
    if (hlen > size - prefix) {
        rc = fail(err, errlen, NPY_EFORMAT, "truncated header");
        goto done;
    }
    rc = parse_header((const char *)bytes + prefix, hlen, out, err, errlen);
    if (rc != NPY_OK)
        goto done;
    uint64_t count = 1;
    for (int i = 0; i < out->ndim; i++) {
        if (out->shape[i] != 0 && count > UINT64_MAX / out->shape[i]) {
            rc = fail(err, errlen, NPY_EFORMAT, "shape too large");
            goto done;
        }
        count *= out->shape[i];
    }
    size_t body = size - prefix - hlen;
    if (count > body / itemsize(out->dtype) || count * itemsize(out->dtype) != body) {
        rc = fail(err, errlen, NPY_EFORMAT, "data is %zu bytes, the header's shape needs %llu",
                  body, (unsigned long long)count * itemsize(out->dtype));
        goto done;
    }
    out->count = count;
    out->data = malloc(body ? body : 1); /* malloc aligns for any type; the file's data may not */
    if (!out->data) {
        rc = fail(err, errlen, NPY_EIO, "out of memory");
        goto done;
    }
    memcpy(out->data, bytes + prefix + hlen, body); /* wasm32 is little-endian, like the file */
done:
    free(bytes);
    return rc;
}

int npy_write_f4(const char *path, const float *data, int ndim, const uint64_t *shape, char *err,
                 size_t errlen) {
    char dims[NPY_MAX_DIMS * 24 + 4];
    size_t n = 0;
    uint64_t count = 1;
    dims[n++] = '(';
    for (int i = 0; i < ndim; i++) {
        n += (size_t)snprintf(dims + n, sizeof dims - n, i ? ", %llu" : "%llu",
                              (unsigned long long)shape[i]);
        count *= shape[i];
    }
    n += (size_t)snprintf(dims + n, sizeof dims - n, ndim == 1 ? ",)" : ")");
    /* Version 1.0, the header padded with spaces and a newline so the data starts on a 64-byte
     * boundary, as numpy writes it. */
    char header[256];
    int len = snprintf(header, sizeof header,
                       "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }", dims);
    size_t total = 10 + (size_t)len + 1;
    size_t pad = (64 - total % 64) % 64;
    if ((size_t)len + pad + 1 > sizeof header)
        return fail(err, errlen, NPY_EFORMAT, "shape too long for a header");
    memset(header + len, ' ', pad);
    header[len + pad] = '\n';
    size_t hlen = (size_t)len + pad + 1;
    unsigned char prefix[10] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0,
                                (unsigned char)(hlen & 0xff), (unsigned char)(hlen >> 8)};
    FILE *f = fopen(path, "wb");
    if (!f)
        return fail(err, errlen, NPY_EIO, "cannot create: %s", strerror(errno));
    int ok = fwrite(prefix, 1, sizeof prefix, f) == sizeof prefix &&
             fwrite(header, 1, hlen, f) == hlen &&
             fwrite(data, sizeof(float), (size_t)count, f) == (size_t)count;
    ok = (fclose(f) == 0) && ok;
    if (!ok)
        return fail(err, errlen, NPY_EIO, "write error");
    return NPY_OK;
}

void npy_free(npy_array *array) {
    free(array->data);
    array->data = NULL;
}
