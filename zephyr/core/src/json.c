/* The streaming JSON scanner: bytes in, events out, any slice size, no recursion.
 *
 * It keeps only the nesting (one bit per level), the key being read, a number's text and the
 * current string's destination, so a message of any length can pass through it. String
 * contents go straight to the buffer the handler names at PB_JEV_STR_BEGIN (or nowhere).
 * It checks JSON syntax and UTF-8 completely; what the values mean is the handler's business.
 */
#include <string.h>

#include "internal.h"

enum {
    J_VALUE,
    J_VALUE_OR_END,
    J_KEY_OR_END,
    J_KEY,
    J_COLON,
    J_AFTER,
    J_STRING,
    J_ESCAPE,
    J_UNICODE,
    J_SURROGATE_SLASH,
    J_SURROGATE_U,
    J_NUMBER,
    J_LITERAL,
    J_DONE,
    J_ERROR,
};

static const char *const literals[3] = {"true", "false", "null"};

void pb_json_begin(struct pb_json *j, pb_json_handler handler, void *user)
{
    memset(j, 0, sizeof *j);
    j->handler = handler;
    j->user = user;
    j->state = J_VALUE;
}

static bool fail(struct pb_json *j, const char *why)
{
    if (j->error == NULL)
        j->error = why;
    j->state = J_ERROR;
    return false;
}

static bool emit(struct pb_json *j, int event)
{
    if (j->handler(j, event) < 0)
        return fail(j, "refused");
    return true;
}

static void value_done(struct pb_json *j) { j->state = j->depth == 0 ? J_DONE : J_AFTER; }

static void put(struct pb_json *j, uint8_t b)
{
    if (j->in_key) {
        if (j->key_len < PB_JSON_KEY_LEN)
            j->key[j->key_len++] = (char)b;
        else
            j->key_over = true;
    } else if (j->sink != NULL) {
        if (j->sink_len < j->sink_cap)
            j->sink[j->sink_len++] = (char)b;
        else
            j->sink_over = true;
    }
}

static void put_code_point(struct pb_json *j, uint32_t cp)
{
    if (cp < 0x80) {
        put(j, (uint8_t)cp);
    } else if (cp < 0x800) {
        put(j, (uint8_t)(0xC0 | cp >> 6));
        put(j, (uint8_t)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        put(j, (uint8_t)(0xE0 | cp >> 12));
        put(j, (uint8_t)(0x80 | ((cp >> 6) & 0x3F)));
        put(j, (uint8_t)(0x80 | (cp & 0x3F)));
    } else {
        put(j, (uint8_t)(0xF0 | cp >> 18));
        put(j, (uint8_t)(0x80 | ((cp >> 12) & 0x3F)));
        put(j, (uint8_t)(0x80 | ((cp >> 6) & 0x3F)));
        put(j, (uint8_t)(0x80 | (cp & 0x3F)));
    }
}

static bool push(struct pb_json *j, bool object)
{
    if (j->depth >= PB_JSON_DEPTH || j->depth >= 32)
        return fail(j, "nesting too deep");
    if (!emit(j, object ? PB_JEV_OBJ_BEGIN : PB_JEV_ARR_BEGIN))
        return false;
    if (object)
        j->stack |= 1u << j->depth;
    else
        j->stack &= ~(1u << j->depth);
    j->depth++;
    j->state = object ? J_KEY_OR_END : J_VALUE_OR_END;
    return true;
}

static bool pop(struct pb_json *j, bool object)
{
    j->depth--;
    if (!emit(j, object ? PB_JEV_OBJ_END : PB_JEV_ARR_END))
        return false;
    value_done(j);
    return true;
}

static bool top_is_object(const struct pb_json *j)
{
    return j->depth > 0 && (j->stack >> (j->depth - 1) & 1u) != 0;
}

/* Checks the number's grammar and converts integers; false when it is not a JSON number. */
static bool number_end(struct pb_json *j)
{
    const char *p = j->num_text;
    bool negative = *p == '-';
    if (negative)
        p++;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (*p >= '0' && *p <= '9')
            p++;
    } else {
        return fail(j, "bad number");
    }
    bool integer = true;
    if (*p == '.') {
        integer = false;
        p++;
        if (!(*p >= '0' && *p <= '9'))
            return fail(j, "bad number");
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p == 'e' || *p == 'E') {
        integer = false;
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!(*p >= '0' && *p <= '9'))
            return fail(j, "bad number");
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p != 0)
        return fail(j, "bad number");
    j->num = 0;
    j->num_kind = integer ? PB_NUM_INT : PB_NUM_FLOAT;
    if (integer && !pb_parse_i64(j->num_text, &j->num))
        j->num_kind = PB_NUM_HUGE;
    if (!emit(j, PB_JEV_NUM))
        return false;
    value_done(j);
    return true;
}

static bool is_space(uint8_t ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r'; }

static int hex_value(uint8_t ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch |= 0x20;
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1;
}

static bool string_begin(struct pb_json *j, bool key)
{
    j->in_key = key;
    j->state = J_STRING;
    j->utf8 = 0;
    j->high = 0;
    if (key) {
        j->key_len = 0;
        j->key_over = false;
        return true;
    }
    j->sink = NULL;
    j->sink_cap = 0;
    j->sink_len = 0;
    j->sink_over = false;
    return emit(j, PB_JEV_STR_BEGIN);
}

static bool string_byte(struct pb_json *j, uint8_t ch)
{
    if (j->utf8 > 0) {
        if (ch < j->utf8_lo || ch > j->utf8_hi)
            return fail(j, "invalid UTF-8");
        j->utf8--;
        j->utf8_lo = 0x80;
        j->utf8_hi = 0xBF;
        put(j, ch);
        return true;
    }
    if (ch == '"') {
        if (j->in_key) {
            j->key[j->key_len] = 0;
            j->in_key = false;
            if (!emit(j, PB_JEV_KEY))
                return false;
            j->state = J_COLON;
            return true;
        }
        if (j->sink != NULL)
            j->sink[j->sink_len] = 0;
        if (!emit(j, PB_JEV_STR_END))
            return false;
        value_done(j);
        return true;
    }
    if (ch == '\\') {
        j->state = J_ESCAPE;
        return true;
    }
    if (ch < 0x20)
        return fail(j, "control character in a string");
    if (ch >= 0x80) {
        j->utf8_lo = 0x80;
        j->utf8_hi = 0xBF;
        if (ch >= 0xC2 && ch <= 0xDF) {
            j->utf8 = 1;
        } else if (ch >= 0xE0 && ch <= 0xEF) {
            j->utf8 = 2;
            if (ch == 0xE0)
                j->utf8_lo = 0xA0; /* no overlong forms */
            if (ch == 0xED)
                j->utf8_hi = 0x9F; /* no surrogates */
        } else if (ch >= 0xF0 && ch <= 0xF4) {
            j->utf8 = 3;
            if (ch == 0xF0)
                j->utf8_lo = 0x90;
            if (ch == 0xF4)
                j->utf8_hi = 0x8F; /* nothing above U+10FFFF */
        } else {
            return fail(j, "invalid UTF-8");
        }
    }
    put(j, ch);
    return true;
}

static bool escape_byte(struct pb_json *j, uint8_t ch)
{
    static const char from[] = "\"\\/bfnrt";
    static const char to[] = "\"\\/\b\f\n\r\t";
    if (ch == 'u') {
        j->state = J_UNICODE;
        j->sub = 0;
        j->code = 0;
        return true;
    }
    const char *at = ch != 0 ? strchr(from, ch) : NULL;
    if (at == NULL)
        return fail(j, "bad escape");
    put(j, (uint8_t)to[at - from]);
    j->state = J_STRING;
    return true;
}

static bool unicode_byte(struct pb_json *j, uint8_t ch)
{
    int v = hex_value(ch);
    if (v < 0)
        return fail(j, "bad \\u escape");
    j->code = j->code << 4 | (uint32_t)v;
    if (++j->sub < 4)
        return true;
    uint32_t code = j->code;
    j->state = J_STRING;
    if (j->high != 0) {
        if (code < 0xDC00 || code > 0xDFFF)
            return fail(j, "lone surrogate");
        code = 0x10000 + ((j->high - 0xD800) << 10) + (code - 0xDC00);
        j->high = 0;
    } else if (code >= 0xD800 && code <= 0xDBFF) {
        j->high = code;
        j->state = J_SURROGATE_SLASH;
        return true;
    } else if (code >= 0xDC00 && code <= 0xDFFF) {
        return fail(j, "lone surrogate");
    } else if (code == 0) {
        /* Strings become C strings on the board: an embedded NUL would cut them silently. */
        return fail(j, "NUL in a string");
    }
    put_code_point(j, code);
    return true;
}

static bool value_begin(struct pb_json *j, uint8_t ch)
{
    switch (ch) {
    case '{':
        return push(j, true);
    case '[':
        return push(j, false);
    case '"':
        return string_begin(j, false);
    case 't':
    case 'f':
    case 'n':
        j->code = ch == 't' ? 0 : ch == 'f' ? 1 : 2;
        j->sub = 1;
        j->state = J_LITERAL;
        return true;
    default:
        if (ch == '-' || (ch >= '0' && ch <= '9')) {
            j->num_text[0] = (char)ch;
            j->num_len = 1;
            j->state = J_NUMBER;
            return true;
        }
        return fail(j, "unexpected character");
    }
}

static bool step(struct pb_json *j, uint8_t ch)
{
    if (j->state == J_NUMBER) {
        if ((ch >= '0' && ch <= '9') || ch == '-' || ch == '+' || ch == '.' || ch == 'e' ||
            ch == 'E') {
            if (j->num_len >= sizeof j->num_text - 1)
                return fail(j, "number too long");
            j->num_text[j->num_len++] = (char)ch;
            return true;
        }
        j->num_text[j->num_len] = 0;
        if (!number_end(j))
            return false;
        /* The number ended at this byte, which belongs to what follows. */
    }
    switch (j->state) {
    case J_STRING:
        return string_byte(j, ch);
    case J_ESCAPE:
        return escape_byte(j, ch);
    case J_UNICODE:
        return unicode_byte(j, ch);
    case J_SURROGATE_SLASH:
        if (ch != '\\')
            return fail(j, "lone surrogate");
        j->state = J_SURROGATE_U;
        return true;
    case J_SURROGATE_U:
        if (ch != 'u')
            return fail(j, "lone surrogate");
        j->state = J_UNICODE;
        j->sub = 0;
        j->code = 0;
        return true;
    case J_LITERAL: {
        const char *lit = literals[j->code];
        if (ch != (uint8_t)lit[j->sub])
            return fail(j, "bad literal");
        if (lit[++j->sub] != 0)
            return true;
        if (!emit(j, PB_JEV_TRUE + (int)j->code))
            return false;
        value_done(j);
        return true;
    }
    default:
        break;
    }
    if (is_space(ch))
        return true;
    switch (j->state) {
    case J_VALUE:
        return value_begin(j, ch);
    case J_VALUE_OR_END:
        if (ch == ']')
            return pop(j, false);
        return value_begin(j, ch);
    case J_KEY_OR_END:
        if (ch == '}')
            return pop(j, true);
        /* fall through */
    case J_KEY:
        if (ch != '"')
            return fail(j, "expected a key");
        return string_begin(j, true);
    case J_COLON:
        if (ch != ':')
            return fail(j, "expected ':'");
        j->state = J_VALUE;
        return true;
    case J_AFTER:
        if (ch == ',') {
            j->state = top_is_object(j) ? J_KEY : J_VALUE;
            return true;
        }
        if (ch == (top_is_object(j) ? '}' : ']'))
            return pop(j, top_is_object(j));
        return fail(j, "expected ',' or a closing bracket");
    case J_DONE:
        return fail(j, "data after the value");
    default:
        return false;
    }
}

bool pb_json_feed(struct pb_json *j, const uint8_t *data, size_t len)
{
    for (size_t i = 0; i < len && j->state != J_ERROR; i++)
        step(j, data[i]);
    return j->state != J_ERROR;
}

bool pb_json_end(struct pb_json *j)
{
    if (j->state == J_NUMBER && j->depth == 0) {
        j->num_text[j->num_len] = 0;
        number_end(j);
    }
    if (j->state == J_ERROR)
        return false;
    if (j->state != J_DONE)
        return fail(j, "truncated");
    return true;
}
