/* Incoming messages: topic dispatch, the desired-set and offer readers, chunk routing.
 *
 * A desired set is read task by task as it streams in, into a staging table; the live task
 * table changes only in pb_commit, after the whole message has been read and found valid.
 * Unknown keys are skipped and nulls count as absent. Inside a task, though, a field the
 * board cannot honour fails that task with a reason instead of being ignored.
 */
#include <string.h>

#include "internal.h"

enum { K_UNKNOWN, K_GENERATION, K_ISSUED_AT, K_ISSUER, K_TASKS };
static const char *const top_keys[] = {"generation", "issued_at", "issuer", "tasks"};

enum {
    T_UNKNOWN,
    T_NAME,
    T_SPEC_HASH,
    T_OWNER,
    T_DIGEST,
    T_SIZE,
    T_IMAGE,
    T_FUNCTION,
    T_ARGS,
    T_ENV,
    T_STDIN,
    T_DAEMON,
    T_MEMORY,
    T_TIMEOUT_MS,
    T_FUEL,
};
static const char *const task_keys[] = {"name",     "spec_hash", "owner", "digest", "size",
                                        "image",    "function",  "args",  "env",    "stdin",
                                        "daemon",   "memory",    "timeout_ms", "fuel"};

enum { O_DIGEST = 1, O_SIZE = 2, O_CHUNK_SIZE = 4, O_CHUNKS = 8, O_ERROR = 16 };
static const char *const offer_keys[] = {"digest", "size", "chunk_size", "chunks", "error"};

/* Bits of pb_spec.seen: the required fields, and whether a function was given. */
#define SEEN_REQUIRED 0x1F
#define SEEN_FUNCTION 0x20

static int lookup(const char *const *keys, int count, const struct pb_json *j)
{
    if (j->key_over)
        return 0;
    for (int i = 0; i < count; i++)
        if (strcmp(keys[i], j->key) == 0)
            return i + 1;
    return 0;
}

static int refuse(struct pb_json *j, const char *why)
{
    j->error = why;
    return -1;
}

static bool is_value_start(int ev)
{
    return ev == PB_JEV_OBJ_BEGIN || ev == PB_JEV_ARR_BEGIN || ev == PB_JEV_STR_BEGIN ||
           ev == PB_JEV_NUM || ev == PB_JEV_TRUE || ev == PB_JEV_FALSE;
}

/* An integer field: `ev` must be an integer within [lo, hi] (or null when nullable). */
static int integer(struct pb_json *j, int ev, int64_t lo, int64_t hi, int64_t *out)
{
    if (ev == PB_JEV_NULL)
        return 0;
    if (ev != PB_JEV_NUM || j->num_kind != PB_NUM_INT || j->num < lo || j->num > hi)
        return refuse(j, "an integer field is not an integer in range");
    *out = j->num;
    return 1;
}

static void sink(struct pb_json *j, char *buf, size_t size)
{
    j->sink = buf;
    j->sink_cap = size - 1;
}

static bool dns_label(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > PB_NAME_LEN || s[0] == '-' || s[n - 1] == '-')
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '-'))
            return false;
    return true;
}

static bool parse_digest(const char *text, uint8_t out[32])
{
    return strlen(text) == 71 && memcmp(text, "sha256:", 7) == 0 &&
           pb_hex_decode(text + 7, 32, out);
}

static void mark_bad(struct pb_spec *s, int bad, const char *key, int index)
{
    if (s->bad != PB_BAD_NONE)
        return; /* the first problem is the one reported */
    s->bad = (uint8_t)bad;
    s->bad_index = (uint8_t)index;
    pb_copy(s->bad_key, sizeof s->bad_key, key != NULL ? key : "");
}

static bool live_holds(const pb_core *c, const char *name)
{
    for (int i = 0; i < PB_MAX_TASKS; i++)
        if (c->tasks[i].used && strcmp(c->tasks[i].spec.name, name) == 0)
            return true;
    return false;
}

static void unplace(struct pb_inbox *in, const struct pb_spec *s)
{
    if (in->unplaced_count >= PB_UNPLACED_MAX) {
        in->lost++;
        return;
    }
    struct pb_unplaced *u = &in->unplaced[in->unplaced_count++];
    memcpy(u->name, s->name, sizeof u->name);
    memcpy(u->spec_hash, s->spec_hash, sizeof u->spec_hash);
    memcpy(u->owner, s->owner, sizeof u->owner);
}

static int task_end(pb_core *c, struct pb_json *j)
{
    struct pb_inbox *in = &c->in;
    struct pb_spec *s = &in->cur;
    if ((s->seen & SEEN_REQUIRED) != SEEN_REQUIRED)
        return refuse(j, "a task lacks name, spec_hash, owner, digest or size");
    for (int i = 0; i < in->staged_count; i++)
        if (strcmp(in->staged[i].name, s->name) == 0)
            return refuse(j, "two tasks with the same name");
    for (int i = 0; i < in->unplaced_count; i++)
        if (strcmp(in->unplaced[i].name, s->name) == 0)
            return refuse(j, "two tasks with the same name");
    if (!(s->seen & SEEN_FUNCTION))
        s->bad = PB_BAD_NO_FUNCTION; /* a WASI command: its args and env are moot */
    if (s->size > PB_MODULE_MAX)
        mark_bad(s, PB_BAD_SIZE, NULL, 0);
    if (in->staged_count < PB_MAX_TASKS) {
        in->staged[in->staged_count++] = *s;
        return 0;
    }
    /* The table is full: a task the board already holds keeps its place over a new one. */
    if (live_holds(c, s->name)) {
        for (int i = 0; i < PB_MAX_TASKS; i++) {
            if (!live_holds(c, in->staged[i].name)) {
                unplace(in, &in->staged[i]);
                in->staged[i] = *s;
                return 0;
            }
        }
    }
    unplace(in, s);
    return 0;
}

static int task_field(pb_core *c, struct pb_json *j, int ev)
{
    struct pb_inbox *in = &c->in;
    struct pb_spec *s = &in->cur;
    int64_t v = 0;
    int r;
    if (j->depth >= 4) {
        if (in->task_key == T_ARGS) {
            if (j->depth > 4 || ev == PB_JEV_STR_BEGIN) {
                if (j->depth == 4)
                    sink(j, in->arg_text, sizeof in->arg_text);
                return 0;
            }
            if (ev != PB_JEV_STR_END)
                return refuse(j, "an argument is not a string");
            int index = in->arg_index++;
            if (index >= PB_ARGS_MAX)
                mark_bad(s, PB_BAD_ARGS, NULL, index);
            else if (j->sink_over || !pb_parse_i64(in->arg_text, &s->args[index]))
                mark_bad(s, PB_BAD_ARG, NULL, index);
            else
                s->argc = (uint8_t)(index + 1);
            return 0;
        }
        if (in->task_key == T_ENV && j->depth == 4) {
            if (ev == PB_JEV_KEY) {
                mark_bad(s, PB_BAD_ENV, NULL, 0);
                return 0;
            }
            if (ev != PB_JEV_STR_BEGIN && ev != PB_JEV_STR_END)
                return refuse(j, "an env value is not a string");
        }
        return 0; /* inside an unknown field's value */
    }
    /* depth 3: a field of the task object */
    if (ev == PB_JEV_KEY) {
        in->task_key = (uint8_t)lookup(task_keys, 14, j);
        if (in->task_key == T_UNKNOWN)
            pb_copy(in->field, sizeof in->field, j->key);
        return 0;
    }
    if (ev == PB_JEV_OBJ_END || ev == PB_JEV_ARR_END)
        return 0; /* an object or array value closed */
    switch (in->task_key) {
    case T_NAME:
    case T_SPEC_HASH:
    case T_OWNER:
    case T_DIGEST:
    case T_FUNCTION:
    case T_IMAGE: {
        if (ev == PB_JEV_NULL && (in->task_key == T_FUNCTION || in->task_key == T_IMAGE))
            return 0;
        if (ev == PB_JEV_STR_BEGIN) {
            switch (in->task_key) {
            case T_NAME: sink(j, s->name, sizeof s->name); break;
            case T_SPEC_HASH: sink(j, s->spec_hash, sizeof s->spec_hash); break;
            case T_OWNER: sink(j, s->owner, sizeof s->owner); break;
            case T_FUNCTION: sink(j, s->function, sizeof s->function); break;
            case T_IMAGE: sink(j, s->image, sizeof s->image); break;
            default: sink(j, in->digest_text, sizeof in->digest_text); break;
            }
            return 0;
        }
        if (ev != PB_JEV_STR_END)
            return refuse(j, "a string field is not a string");
        switch (in->task_key) {
        case T_NAME:
            if (j->sink_over || !dns_label(s->name))
                return refuse(j, "a task name is not a DNS label");
            s->seen |= 1;
            break;
        case T_SPEC_HASH:
            if (j->sink_over || s->spec_hash[0] == 0)
                return refuse(j, "a spec_hash is empty or longer than 80 characters");
            s->seen |= 2;
            break;
        case T_OWNER:
            if (j->sink_over || s->owner[0] == 0)
                return refuse(j, "an owner is empty or longer than 63 characters");
            s->seen |= 4;
            break;
        case T_DIGEST:
            if (j->sink_over || !parse_digest(in->digest_text, s->digest))
                return refuse(j, "a digest is not sha256:<64 hex>");
            s->seen |= 8;
            break;
        case T_FUNCTION:
            s->seen |= SEEN_FUNCTION;
            if (j->sink_over)
                mark_bad(s, PB_BAD_TOO_LONG, "function", PB_FUNCTION_LEN);
            break;
        default:
            if (j->sink_over)
                mark_bad(s, PB_BAD_TOO_LONG, "image", PB_IMAGE_LEN);
            break;
        }
        return 0;
    }
    case T_SIZE:
        r = integer(j, ev, 0, 1LL << 32, &v);
        if (r == 0)
            return refuse(j, "a task size is null");
        s->size = (uint64_t)v;
        s->seen |= 16;
        return r < 0 ? r : 0;
    case T_MEMORY:
        r = integer(j, ev, 65536, 1LL << 32, &v);
        s->limits.memory = (uint64_t)v;
        return r < 0 ? r : 0;
    case T_TIMEOUT_MS:
        r = integer(j, ev, 1, PB_MAX_INT, &s->limits.timeout_ms);
        return r < 0 ? r : 0;
    case T_FUEL:
        r = integer(j, ev, 1, PB_MAX_INT, &s->limits.fuel);
        return r < 0 ? r : 0;
    case T_DAEMON:
        if (ev == PB_JEV_TRUE || ev == PB_JEV_FALSE)
            s->daemon = ev == PB_JEV_TRUE;
        else if (ev != PB_JEV_NULL)
            return refuse(j, "daemon is not a boolean");
        return 0;
    case T_ARGS:
        if (ev != PB_JEV_ARR_BEGIN && ev != PB_JEV_NULL)
            return refuse(j, "args is not a list");
        return 0;
    case T_ENV:
        if (ev != PB_JEV_OBJ_BEGIN && ev != PB_JEV_NULL)
            return refuse(j, "env is not an object");
        return 0;
    case T_STDIN:
        if (ev == PB_JEV_STR_BEGIN)
            return 0;
        if (ev == PB_JEV_STR_END)
            mark_bad(s, PB_BAD_STDIN, NULL, 0);
        else if (ev != PB_JEV_NULL)
            return refuse(j, "stdin is not a string");
        return 0;
    default:
        if (is_value_start(ev))
            mark_bad(s, PB_BAD_FIELD, in->field, 0);
        return 0;
    }
}

static int desired_event(struct pb_json *j, int ev)
{
    pb_core *c = j->user;
    struct pb_inbox *in = &c->in;
    switch (j->depth) {
    case 0:
        if (ev != PB_JEV_OBJ_BEGIN && ev != PB_JEV_OBJ_END)
            return refuse(j, "a desired set is not an object");
        if (ev == PB_JEV_OBJ_END && in->generation <= 0)
            return refuse(j, "a desired set without a generation");
        return 0;
    case 1:
        if (ev == PB_JEV_KEY) {
            in->top_key = (uint8_t)lookup(top_keys, 4, j);
            return 0;
        }
        switch (in->top_key) {
        case K_GENERATION: {
            int r = integer(j, ev, 1, PB_MAX_INT, &in->generation);
            return r < 0 ? r : 0;
        }
        case K_ISSUED_AT:
            if (ev == PB_JEV_NUM && j->num_text[0] != '-')
                return 0;
            return ev == PB_JEV_NULL ? 0 : refuse(j, "issued_at is not a timestamp");
        case K_ISSUER:
            if (ev == PB_JEV_STR_BEGIN || ev == PB_JEV_STR_END || ev == PB_JEV_NULL)
                return 0;
            return refuse(j, "issuer is not a string");
        case K_TASKS:
            if (ev == PB_JEV_ARR_BEGIN || ev == PB_JEV_ARR_END || ev == PB_JEV_NULL)
                return 0;
            return refuse(j, "tasks is not a list");
        default:
            return 0;
        }
    default:
        break;
    }
    if (in->top_key != K_TASKS)
        return 0; /* inside an unknown top-level field */
    if (j->depth == 2) {
        if (ev == PB_JEV_OBJ_BEGIN) {
            memset(&in->cur, 0, sizeof in->cur);
            in->task_key = T_UNKNOWN;
            in->arg_index = 0;
            return 0;
        }
        if (ev == PB_JEV_OBJ_END)
            return task_end(c, j);
        return refuse(j, "a task is not an object");
    }
    return task_field(c, j, ev);
}

static int offer_event(struct pb_json *j, int ev)
{
    pb_core *c = j->user;
    struct pb_inbox *in = &c->in;
    int64_t lo = 0, hi = 0, *dst = NULL;
    if (j->depth == 0) {
        if (ev != PB_JEV_OBJ_BEGIN && ev != PB_JEV_OBJ_END)
            return refuse(j, "an offer is not an object");
        return 0;
    }
    if (j->depth > 1)
        return 0;
    if (ev == PB_JEV_KEY) {
        in->top_key = (uint8_t)lookup(offer_keys, 5, j);
        return 0;
    }
    switch (in->top_key) {
    case 1: /* digest */
        if (ev == PB_JEV_STR_BEGIN) {
            sink(j, in->digest_text, sizeof in->digest_text);
            return 0;
        }
        if (ev != PB_JEV_STR_END)
            return refuse(j, "an offer digest is not a string");
        in->offer_seen |= O_DIGEST;
        return 0;
    case 2: lo = 0; hi = 1LL << 32; dst = &in->size; break;
    case 3: lo = 64; hi = 4LL << 20; dst = &in->chunk_size; break;
    case 4: lo = 0; hi = 1LL << 26; dst = &in->chunks; break;
    case 5: /* error */
        if (ev == PB_JEV_STR_BEGIN) {
            sink(j, in->error, sizeof in->error);
            return 0;
        }
        if (ev == PB_JEV_STR_END) {
            in->has_error = true;
            if (j->sink_over)
                pb_utf8_trim(in->error); /* a cut text must end on a whole sequence */
            return 0;
        }
        return ev == PB_JEV_NULL ? 0 : refuse(j, "an offer error is not a string");
    default:
        return 0;
    }
    int r = integer(j, ev, lo, hi, dst);
    if (r > 0)
        in->offer_seen |= (uint8_t)(1u << (in->top_key - 1));
    return r < 0 ? r : 0;
}

static void drop(pb_core *c, const char *why)
{
    c->in.mode = PB_MODE_BAD;
    c->in.quiet = false;
    if (c->last_error[0] == 0)
        pb_copy(c->last_error, sizeof c->last_error, why);
}

void pb_inbox_begin(pb_core *c, const char *topic, size_t total)
{
    struct pb_inbox *in = &c->in;
    in->mode = PB_MODE_IGNORE;
    in->total = total;
    in->got = 0;
    c->last_error[0] = 0;
    pb_copy(c->topic, sizeof c->topic, topic);
    if (strncmp(topic, c->root, c->root_len) != 0) {
        drop(c, "topic outside this board's namespace");
        return;
    }
    const char *rest = topic + c->root_len;
    if (strcmp(rest, "desired") == 0) {
        if (total == 0) {
            pb_log(c, PB_LOG_WARN, "retained desired set cleared on the broker; keeping tasks",
                   NULL);
            return;
        }
        if (total > PB_MAX_MESSAGE) {
            drop(c, "message larger than 256 KiB");
            return;
        }
        in->mode = PB_MODE_DESIRED;
        in->generation = 0;
        in->staged_count = 0;
        in->unplaced_count = 0;
        in->lost = 0;
        in->top_key = K_UNKNOWN;
        pb_json_begin(&in->json, desired_event, c);
        return;
    }
    if (strncmp(rest, "artifacts/", 10) == 0 && strlen(rest) > 10 + 65 && rest[10 + 64] == '/' &&
        pb_hex_decode(rest + 10, 32, in->digest)) {
        const char *last = rest + 10 + 65;
        if (strcmp(last, "offer") == 0) {
            if (total > PB_MAX_MESSAGE) {
                drop(c, "message larger than 256 KiB");
                return;
            }
            in->mode = PB_MODE_OFFER;
            in->offer_seen = 0;
            in->has_error = false;
            in->error[0] = 0;
            in->top_key = 0;
            pb_json_begin(&in->json, offer_event, c);
            return;
        }
        size_t n = strlen(last);
        uint32_t index = 0;
        for (size_t i = 0; i < n; i++) {
            if (last[i] < '0' || last[i] > '9' || n > 9) {
                drop(c, "unexpected artifact topic");
                return;
            }
            index = index * 10 + (uint32_t)(last[i] - '0');
        }
        int m = pb_module_find(c, in->digest);
        if (m < 0 || c->modules[m].state != PB_MOD_FILL) {
            drop(c, "chunk of an artifact no transfer waits for");
            in->quiet = true; /* late copies after completion are normal */
            return;
        }
        if (!pb_module_chunk_begin(c, m, index, total)) {
            drop(c, "chunk refused: its length does not fit its index");
            return;
        }
        in->mode = PB_MODE_CHUNK;
        return;
    }
    /* Its own retained messages come back when the subscription covers them: not an error. */
    static const char *const own[] = {"announce", "heartbeat", "presence", "state"};
    for (int i = 0; i < 4; i++)
        if (strcmp(rest, own[i]) == 0)
            return;
    if (strncmp(rest, "results/", 8) == 0)
        return;
    drop(c, "unexpected topic");
}

void pb_inbox_data(pb_core *c, const uint8_t *data, size_t len)
{
    struct pb_inbox *in = &c->in;
    if (in->mode == PB_MODE_IGNORE || in->mode == PB_MODE_BAD)
        return;
    if (len > in->total - in->got) {
        drop(c, "more bytes than the message announced");
        return;
    }
    in->got += len;
    if (in->mode == PB_MODE_CHUNK) {
        pb_module_chunk_data(c, data, len);
        return;
    }
    if (!pb_json_feed(&in->json, data, len))
        drop(c, in->json.error);
}

int pb_inbox_end(pb_core *c)
{
    struct pb_inbox *in = &c->in;
    int mode = in->mode;
    in->mode = PB_MODE_IGNORE;
    if (mode == PB_MODE_IGNORE)
        return PB_OK;
    if (mode != PB_MODE_BAD && in->got != in->total) {
        mode = PB_MODE_BAD;
        pb_copy(c->last_error, sizeof c->last_error, "message shorter than announced");
    }
    if (mode == PB_MODE_CHUNK) {
        pb_module_chunk_end(c);
        return PB_OK;
    }
    if (mode != PB_MODE_BAD && !pb_json_end(&in->json)) {
        mode = PB_MODE_BAD;
        pb_copy(c->last_error, sizeof c->last_error, in->json.error);
    }
    if (mode == PB_MODE_OFFER) {
        static const char *const why[] = {
            "an offer lacks digest, size, chunk_size or chunks",
            "an offer's digest does not match its topic",
            "an offer's chunk count does not match its size",
        };
        int bad = -1;
        char expect[72] = "sha256:";
        struct pb_out o;
        pb_out_init(&o, expect + 7, sizeof expect - 7);
        pb_out_hex(&o, in->digest, 32);
        pb_out_end(&o);
        if ((in->offer_seen & 15) != 15)
            bad = 0;
        else if (strcmp(in->digest_text, expect) != 0)
            bad = 1;
        else if (in->chunks != (in->size + in->chunk_size - 1) / in->chunk_size)
            bad = 2;
        if (bad >= 0) {
            mode = PB_MODE_BAD;
            pb_copy(c->last_error, sizeof c->last_error, why[bad]);
        } else {
            int m = pb_module_find(c, in->digest);
            if (m >= 0 && c->modules[m].state != PB_MOD_READY)
                pb_module_offer(c, m);
            return PB_OK;
        }
    }
    if (mode == PB_MODE_DESIRED) {
        pb_commit(c);
        return PB_OK;
    }
    pb_log(c, in->quiet ? PB_LOG_DEBUG : PB_LOG_WARN, "dropped a message: ", c->last_error);
    pb_log(c, PB_LOG_DEBUG, "  on topic ", c->topic);
    return PB_E_DROPPED;
}
