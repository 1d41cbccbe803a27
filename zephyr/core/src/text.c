/* Text in and out: the bounded output writer with JSON escaping as pydantic does it, number
 * formatting (Python's float repr for millisecond timestamps), and bounded string copies that
 * never cut a UTF-8 sequence. No printf: it would cost more flash than all of this. */
#include <string.h>

#include "internal.h"

void pb_out_init(struct pb_out *o, char *buf, size_t cap)
{
    o->buf = buf;
    o->cap = cap;
    o->len = 0;
    o->over = cap == 0;
}

void pb_out_char(struct pb_out *o, char c)
{
    /* One byte is always kept for the NUL. */
    if (o->len + 1 < o->cap)
        o->buf[o->len++] = c;
    else
        o->over = true;
}

void pb_out_raw(struct pb_out *o, const char *text)
{
    while (*text != 0)
        pb_out_char(o, *text++);
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 when it is not one. */
static size_t utf8_length(const uint8_t *s)
{
    uint8_t b = s[0];
    size_t n;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b < 0x80)
        return 1;
    if (b >= 0xC2 && b <= 0xDF)
        n = 2;
    else if (b >= 0xE0 && b <= 0xEF)
        n = 3;
    else if (b >= 0xF0 && b <= 0xF4)
        n = 4;
    else
        return 0;
    if (b == 0xE0)
        lo = 0xA0;
    else if (b == 0xED)
        hi = 0x9F;
    else if (b == 0xF0)
        lo = 0x90;
    else if (b == 0xF4)
        hi = 0x8F;
    for (size_t i = 1; i < n; i++) {
        if (s[i] < lo || s[i] > hi)
            return 0;
        lo = 0x80;
        hi = 0xBF;
    }
    return n;
}

void pb_out_str(struct pb_out *o, const char *text)
{
    static const char hex[] = "0123456789abcdef";
    const uint8_t *s = (const uint8_t *)text;
    pb_out_char(o, '"');
    while (*s != 0) {
        uint8_t b = *s;
        const char *esc = NULL;
        switch (b) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default: break;
        }
        if (esc != NULL) {
            pb_out_raw(o, esc);
            s++;
        } else if (b < 0x20) {
            pb_out_raw(o, "\\u00");
            pb_out_char(o, hex[b >> 4]);
            pb_out_char(o, hex[b & 15]);
            s++;
        } else {
            size_t n = utf8_length(s);
            if (n == 0) {
                /* Text from the platform may be anything; the JSON must stay valid UTF-8. */
                pb_out_char(o, '?');
                s++;
            } else {
                while (n-- > 0)
                    pb_out_char(o, (char)*s++);
            }
        }
    }
    pb_out_char(o, '"');
}

static void out_u64(struct pb_out *o, uint64_t v)
{
    char digits[21];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    while (n > 0)
        pb_out_char(o, digits[--n]);
}

void pb_out_i64(struct pb_out *o, int64_t value)
{
    uint64_t v = (uint64_t)value;
    if (value < 0) {
        pb_out_char(o, '-');
        v = 0 - v;
    }
    out_u64(o, v);
}

void pb_out_secs(struct pb_out *o, int64_t ms)
{
    /* repr() of n/1000 for n < 2^53 is the plain decimal: at most 3 fraction digits, trailing
     * zeros trimmed, at least one digit after the point. */
    if (ms < 0)
        ms = 0;
    out_u64(o, (uint64_t)ms / 1000);
    pb_out_char(o, '.');
    unsigned frac = (unsigned)((uint64_t)ms % 1000);
    if (frac == 0) {
        pb_out_char(o, '0');
        return;
    }
    char d[3] = {(char)('0' + frac / 100), (char)('0' + frac / 10 % 10), (char)('0' + frac % 10)};
    int n = 3;
    while (d[n - 1] == '0')
        n--;
    for (int i = 0; i < n; i++)
        pb_out_char(o, d[i]);
}

void pb_out_hex(struct pb_out *o, const uint8_t *bytes, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < len; i++) {
        pb_out_char(o, hex[bytes[i] >> 4]);
        pb_out_char(o, hex[bytes[i] & 15]);
    }
}

int pb_out_end(struct pb_out *o)
{
    if (o->cap == 0)
        return -1;
    o->buf[o->len] = 0;
    return o->over ? -1 : (int)o->len;
}

char *pb_append(char *dst, size_t cap, const char *src)
{
    size_t len = 0;
    while (len < cap && dst[len] != 0)
        len++;
    if (len >= cap)
        return dst;
    size_t room = cap - 1 - len, n = strlen(src);
    if (n > room) {
        n = room;
        /* Back off to the start of a UTF-8 sequence, so the cut text stays valid. */
        while (n > 0 && ((uint8_t)src[n] & 0xC0) == 0x80)
            n--;
    }
    memcpy(dst + len, src, n);
    dst[len + n] = 0;
    return dst;
}

char *pb_copy(char *dst, size_t cap, const char *src)
{
    if (cap > 0)
        dst[0] = 0;
    return pb_append(dst, cap, src);
}

char *pb_append_i64(char *dst, size_t cap, int64_t value)
{
    char text[24];
    struct pb_out o;
    pb_out_init(&o, text, sizeof text);
    pb_out_i64(&o, value);
    pb_out_end(&o);
    return pb_append(dst, cap, text);
}

bool pb_parse_i64(const char *text, int64_t *value)
{
    bool negative = *text == '-';
    if (negative)
        text++;
    if (*text == 0)
        return false;
    uint64_t v = 0, limit = negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (; *text != 0; text++) {
        if (*text < '0' || *text > '9')
            return false;
        unsigned d = (unsigned)(*text - '0');
        if (v > (limit - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *value = negative ? (int64_t)(0 - v) : (int64_t)v;
    return true;
}

bool pb_hex_decode(const char *hex, size_t len, uint8_t *out)
{
    for (size_t i = 0; i < len; i++) {
        uint8_t b = 0;
        for (size_t k = 0; k < 2; k++) {
            char ch = hex[2 * i + k];
            b <<= 4;
            if (ch >= '0' && ch <= '9')
                b |= (uint8_t)(ch - '0');
            else if (ch >= 'a' && ch <= 'f')
                b |= (uint8_t)(ch - 'a' + 10);
            else
                return false; /* the protocol's digests are lower-case */
        }
        out[i] = b;
    }
    return true;
}

void pb_utf8_trim(char *s)
{
    size_t n = strlen(s);
    if (n == 0)
        return;
    size_t p = n - 1;
    while (p > 0 && ((uint8_t)s[p] & 0xC0) == 0x80)
        p--;
    uint8_t lead = (uint8_t)s[p];
    size_t need = lead >= 0xF0 ? 4u : lead >= 0xE0 ? 3u : lead >= 0xC0 ? 2u : 1u;
    if (p + need > n)
        s[p] = 0;
}
