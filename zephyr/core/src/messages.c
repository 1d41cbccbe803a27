/* Topics and encoders of the messages a board sends, byte for byte as pydantic encodes them
 * (Model.encode(): compact, fields in declaration order, None left out, defaults kept). */
#include <string.h>

#include "internal.h"

const char *const pb_state_names[5] = {"Pending", "Running", "Completed", "Failed", "Stopped"};

/* m/{domain}/c/{channel}: the namespace every topic lives under */
static void root(struct pb_out *o, const struct pb_ident *id)
{
    pb_out_raw(o, "m/");
    pb_out_raw(o, id->domain);
    pb_out_raw(o, "/c/");
    pb_out_raw(o, id->channel);
}

int pb_topic(const struct pb_ident *id, char *buf, size_t cap, const char *suffix,
             const char *suffix2)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    root(&o, id);
    pb_out_raw(&o, "/proplets/");
    pb_out_raw(&o, id->id);
    pb_out_char(&o, '/');
    if (suffix != NULL)
        pb_out_raw(&o, suffix);
    if (suffix2 != NULL)
        pb_out_raw(&o, suffix2);
    return pb_out_end(&o);
}

int pb_topic_request(const struct pb_ident *id, char *buf, size_t cap)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    root(&o, id);
    pb_out_raw(&o, "/artifacts/request");
    return pb_out_end(&o);
}

/* {"proplet":"ID" */
static void head(struct pb_out *o, const struct pb_ident *id)
{
    pb_out_raw(o, "{\"proplet\":");
    pb_out_str(o, id->id);
}

/* ,"runtime":"wamr","labels":{...},"max_tasks":N */
static void runtime_labels_capacity(struct pb_out *o, const struct pb_ident *id)
{
    pb_out_raw(o, ",\"runtime\":\"wamr\",\"labels\":{");
    for (int i = 0; i < id->label_count; i++) {
        if (i > 0)
            pb_out_char(o, ',');
        pb_out_str(o, id->label_keys[i]);
        pb_out_char(o, ':');
        pb_out_str(o, id->label_values[i]);
    }
    pb_out_raw(o, "},\"max_tasks\":");
    pb_out_i64(o, PB_MAX_TASKS);
}

int pb_encode_announce(const struct pb_ident *id, char *buf, size_t cap)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    head(&o, id);
    runtime_labels_capacity(&o, id);
    pb_out_raw(&o, ",\"heartbeat_s\":");
    pb_out_secs(&o, id->heartbeat_ms);
    pb_out_raw(&o, ",\"version\":");
    pb_out_str(&o, id->version);
    pb_out_raw(&o, ",\"protocol\":1}");
    return pb_out_end(&o);
}

int pb_encode_presence(const struct pb_ident *id, bool online, char *buf, size_t cap)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    head(&o, id);
    pb_out_raw(&o, online ? ",\"online\":true}" : ",\"online\":false}");
    return pb_out_end(&o);
}

int pb_encode_heartbeat(const struct pb_ident *id, uint64_t seq, int64_t ts_ms, int running,
                        int64_t generation, char *buf, size_t cap)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    head(&o, id);
    pb_out_raw(&o, ",\"seq\":");
    pb_out_i64(&o, (int64_t)seq);
    pb_out_raw(&o, ",\"ts\":");
    pb_out_secs(&o, ts_ms);
    pb_out_raw(&o, ",\"interval_s\":");
    pb_out_secs(&o, id->heartbeat_ms);
    pb_out_raw(&o, ",\"running\":");
    pb_out_i64(&o, running);
    pb_out_raw(&o, ",\"observed_generation\":");
    pb_out_i64(&o, generation);
    pb_out_char(&o, '}');
    return pb_out_end(&o);
}

static void field_str(struct pb_out *o, const char *key, const char *value)
{
    pb_out_raw(o, key);
    pb_out_str(o, value);
}

static void field_int(struct pb_out *o, const char *key, int64_t value)
{
    pb_out_raw(o, key);
    pb_out_i64(o, value);
}

static void field_secs(struct pb_out *o, const char *key, int64_t ms)
{
    pb_out_raw(o, key);
    pb_out_secs(o, ms);
}

int pb_encode_state(const struct pb_ident *id, int64_t generation, int64_t ts_ms,
                    const struct pb_status_view *tasks, int count, bool terse, char *buf,
                    size_t cap)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    head(&o, id);
    runtime_labels_capacity(&o, id);
    field_int(&o, ",\"observed_generation\":", generation);
    field_secs(&o, ",\"ts\":", ts_ms);
    pb_out_raw(&o, ",\"tasks\":[");
    for (int i = 0; i < count; i++) {
        const struct pb_status_view *t = &tasks[i];
        if (i > 0)
            pb_out_char(&o, ',');
        field_str(&o, "{\"name\":", t->name);
        field_str(&o, ",\"spec_hash\":", t->spec_hash);
        field_str(&o, ",\"owner\":", t->owner);
        field_str(&o, ",\"state\":", pb_state_names[t->state]);
        field_int(&o, ",\"restarts\":", t->restarts);
        field_int(&o, ",\"runs\":", t->runs);
        if (t->started_ms >= 0)
            field_secs(&o, ",\"started_at\":", t->started_ms);
        if (t->finished_ms >= 0)
            field_secs(&o, ",\"finished_at\":", t->finished_ms);
        if (!terse && t->result != NULL)
            field_str(&o, ",\"result\":", t->result);
        if (!terse && t->reason != NULL)
            field_str(&o, ",\"reason\":", t->reason);
        pb_out_char(&o, '}');
    }
    field_str(&o, "],\"version\":", id->version);
    pb_out_char(&o, '}');
    return pb_out_end(&o);
}

int pb_encode_result(const struct pb_ident *id, const struct pb_result_view *r, char *buf,
                     size_t cap)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    head(&o, id);
    field_str(&o, ",\"task\":", r->task);
    field_str(&o, ",\"spec_hash\":", r->spec_hash);
    field_str(&o, ",\"state\":", pb_state_names[r->state]);
    field_int(&o, ",\"runs\":", r->runs);
    field_secs(&o, ",\"started_at\":", r->started_ms);
    field_secs(&o, ",\"finished_at\":", r->finished_ms);
    if (r->nresults >= 0) {
        pb_out_raw(&o, ",\"result\":[");
        if (r->nresults > 0) {
            pb_out_char(&o, '"');
            pb_out_i64(&o, r->result);
            pb_out_char(&o, '"');
        }
        pb_out_char(&o, ']');
    }
    pb_out_raw(&o, ",\"stdout\":\"\",\"stderr\":\"\",\"truncated\":false");
    if (r->error != NULL)
        field_str(&o, ",\"error\":", r->error);
    pb_out_char(&o, '}');
    return pb_out_end(&o);
}

int pb_encode_request(const struct pb_ident *id, const uint8_t digest[32], uint32_t chunk_size,
                      const uint32_t *chunks, int nchunks, const char *image, char *buf,
                      size_t cap)
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    head(&o, id);
    pb_out_raw(&o, ",\"digest\":\"sha256:");
    pb_out_hex(&o, digest, 32);
    field_int(&o, "\",\"chunk_size\":", chunk_size);
    if (chunks != NULL) {
        pb_out_raw(&o, ",\"chunks\":[");
        for (int i = 0; i < nchunks; i++) {
            if (i > 0)
                pb_out_char(&o, ',');
            pb_out_i64(&o, chunks[i]);
        }
        pb_out_char(&o, ']');
    }
    if (image != NULL && image[0] != 0)
        field_str(&o, ",\"image\":", image);
    pb_out_char(&o, '}');
    return pb_out_end(&o);
}
