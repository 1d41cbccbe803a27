/* The host build of the board core: a flat C interface over core.h for ctypes and other FFIs.
 * Each flat callback is wrapped by a small adapter that fits struct pb_platform. */
#include "board.h"

#include <string.h>

#include "propeller/core.h"

#define PBH_EXPORT __attribute__((visibility("default")))
#define PBH_MAGIC 0x50424831u /* "PBH1" */

struct pbh {
    uint32_t magic;
    struct pb_platform platform;
    pb_core *core;
    pbh_clock_fn now, wall;
    pbh_publish_fn publish;
    pbh_subscribe_fn subscribe;
    pbh_wasm_start_fn wasm_start;
    pbh_wasm_stop_fn wasm_stop;
    pbh_kv_get_fn kv_get;
    pbh_kv_set_fn kv_set;
    pbh_log_fn log;
    void *now_ctx, *wall_ctx, *publish_ctx, *subscribe_ctx, *start_ctx, *stop_ctx, *get_ctx,
        *set_ctx, *log_ctx;
};

#define HEADER_BYTES ((sizeof(struct pbh) + 7u) & ~(size_t)7u)

static struct pbh *handle(void *h)
{
    struct pbh *p = h;
    return p != NULL && p->magic == PBH_MAGIC && p->core != NULL ? p : NULL;
}

static int64_t a_now(void *ctx)
{
    struct pbh *h = ctx;
    return h->now != NULL ? h->now(h->now_ctx) : 0;
}

static int64_t a_wall(void *ctx)
{
    struct pbh *h = ctx;
    return h->wall != NULL ? h->wall(h->wall_ctx) : -1;
}

static int a_publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos,
                     bool retain)
{
    struct pbh *h = ctx;
    return h->publish != NULL ? h->publish(h->publish_ctx, topic, payload, len, qos, retain) : -1;
}

static int a_subscribe(void *ctx, const char *filter, int qos)
{
    struct pbh *h = ctx;
    return h->subscribe != NULL ? h->subscribe(h->subscribe_ctx, filter, qos) : -1;
}

static int a_start(void *ctx, int slot, const uint8_t *module, size_t len, const char *function,
                   int argc, const int64_t *args, const struct pb_limits *limits)
{
    struct pbh *h = ctx;
    if (h->wasm_start == NULL)
        return -1;
    return h->wasm_start(h->start_ctx, slot, module, len, function, argc, args,
                         (int64_t)limits->memory, limits->timeout_ms, limits->fuel);
}

static void a_stop(void *ctx, int slot)
{
    struct pbh *h = ctx;
    if (h->wasm_stop != NULL)
        h->wasm_stop(h->stop_ctx, slot);
}

static int a_kv_get(void *ctx, const char *key, void *buf, size_t len)
{
    struct pbh *h = ctx;
    return h->kv_get != NULL ? h->kv_get(h->get_ctx, key, buf, len) : -1;
}

static int a_kv_set(void *ctx, const char *key, const void *buf, size_t len)
{
    struct pbh *h = ctx;
    return h->kv_set != NULL ? h->kv_set(h->set_ctx, key, buf, len) : -1;
}

static void a_log(void *ctx, int level, const char *msg)
{
    struct pbh *h = ctx;
    if (h->log != NULL)
        h->log(h->log_ctx, level, msg);
}

PBH_EXPORT size_t pbh_size(void) { return HEADER_BYTES + pb_arena_size(); }

PBH_EXPORT int pbh_init(void *mem, size_t len, const char *proplet_id, const char *domain,
                        const char *channel, const char *labels, int heartbeat_ms,
                        const char *version)
{
    if (mem == NULL || ((uintptr_t)mem & 7u) != 0 || len < pbh_size() || heartbeat_ms < 0)
        return PB_E_ARG;
    struct pbh *h = mem;
    memset(h, 0, sizeof *h);
    struct pb_platform *p = &h->platform;
    p->ctx = h;
    p->now_ms = a_now;
    p->wall_ms = a_wall;
    p->publish = a_publish;
    p->subscribe = a_subscribe;
    p->wasm_start = a_start;
    p->wasm_stop = a_stop;
    p->kv_get = a_kv_get;
    p->kv_set = a_kv_set;
    p->log = a_log;
    /* "k=v,k=v" into NUL-terminated pieces; pb_init copies them. */
    char text[PB_LABELS_MAX * (PB_LABEL_KEY_LEN + PB_LABEL_VALUE_LEN + 2) + 1];
    struct pb_label pairs[PB_LABELS_MAX];
    int count = 0;
    if (labels != NULL && labels[0] != 0) {
        if (strlen(labels) >= sizeof text)
            return PB_E_ARG;
        strcpy(text, labels);
        char *at = text;
        while (at != NULL) {
            char *next = strchr(at, ',');
            if (next != NULL)
                *next++ = 0;
            char *eq = strchr(at, '=');
            if (eq == NULL || eq == at || count == PB_LABELS_MAX)
                return PB_E_ARG;
            *eq = 0;
            pairs[count].key = at;
            pairs[count].value = eq + 1;
            count++;
            at = next;
        }
    }
    struct pb_identity id = {
        .proplet_id = proplet_id,
        .domain = domain,
        .channel = channel,
        .labels = pairs,
        .label_count = count,
        .heartbeat_ms = (uint32_t)heartbeat_ms,
        .version = version,
    };
    h->core = pb_init((uint8_t *)mem + HEADER_BYTES, len - HEADER_BYTES, p, &id);
    if (h->core == NULL)
        return PB_E_ARG;
    h->magic = PBH_MAGIC;
    return PB_OK;
}

#define SETTER(name, type, field, ctxfield)                                                   \
    PBH_EXPORT void pbh_set_##name(void *h, type fn, void *ctx)                               \
    {                                                                                         \
        struct pbh *p = handle(h);                                                            \
        if (p != NULL) {                                                                      \
            p->field = fn;                                                                    \
            p->ctxfield = ctx;                                                                \
        }                                                                                     \
    }

SETTER(now, pbh_clock_fn, now, now_ctx)
SETTER(wall, pbh_clock_fn, wall, wall_ctx)
SETTER(publish, pbh_publish_fn, publish, publish_ctx)
SETTER(subscribe, pbh_subscribe_fn, subscribe, subscribe_ctx)
SETTER(wasm_start, pbh_wasm_start_fn, wasm_start, start_ctx)
SETTER(wasm_stop, pbh_wasm_stop_fn, wasm_stop, stop_ctx)
SETTER(kv_get, pbh_kv_get_fn, kv_get, get_ctx)
SETTER(kv_set, pbh_kv_set_fn, kv_set, set_ctx)
SETTER(log, pbh_log_fn, log, log_ctx)

PBH_EXPORT int pbh_will(void *h, char *topic, size_t topic_cap, char *payload,
                        size_t payload_cap)
{
    struct pbh *p = handle(h);
    if (p == NULL || topic == NULL || payload == NULL)
        return PB_E_ARG;
    return pb_will(p->core, topic, topic_cap, payload, payload_cap);
}

PBH_EXPORT void pbh_connect(void *h)
{
    struct pbh *p = handle(h);
    if (p != NULL)
        pb_on_connect(p->core);
}

PBH_EXPORT void pbh_disconnect(void *h)
{
    struct pbh *p = handle(h);
    if (p != NULL)
        pb_on_disconnect(p->core);
}

PBH_EXPORT void pbh_message_begin(void *h, const char *topic, size_t total_len)
{
    struct pbh *p = handle(h);
    if (p != NULL)
        pb_message_begin(p->core, topic, total_len);
}

PBH_EXPORT void pbh_message_data(void *h, const uint8_t *data, size_t len)
{
    struct pbh *p = handle(h);
    if (p != NULL)
        pb_message_data(p->core, data, len);
}

PBH_EXPORT int pbh_message_end(void *h)
{
    struct pbh *p = handle(h);
    return p != NULL ? pb_message_end(p->core) : PB_E_ARG;
}

PBH_EXPORT int pbh_message(void *h, const char *topic, const uint8_t *payload, size_t len)
{
    struct pbh *p = handle(h);
    return p != NULL ? pb_message(p->core, topic, payload, len) : PB_E_ARG;
}

PBH_EXPORT void pbh_tick(void *h, int64_t now_ms)
{
    struct pbh *p = handle(h);
    if (p != NULL)
        pb_tick(p->core, now_ms);
}

PBH_EXPORT int64_t pbh_next_deadline(void *h)
{
    struct pbh *p = handle(h);
    return p != NULL ? pb_next_deadline(p->core) : 0;
}

PBH_EXPORT void pbh_task_finished(void *h, int slot, int status, int nresults, int64_t result,
                                  const char *error)
{
    struct pbh *p = handle(h);
    if (p != NULL)
        pb_task_finished(p->core, slot, status, nresults, result, error);
}

PBH_EXPORT int pbh_running(void *h)
{
    struct pbh *p = handle(h);
    return p != NULL ? pb_running(p->core) : 0;
}

PBH_EXPORT int64_t pbh_observed_generation(void *h)
{
    struct pbh *p = handle(h);
    return p != NULL ? pb_observed_generation(p->core) : 0;
}

PBH_EXPORT const char *pbh_last_error(void *h)
{
    struct pbh *p = handle(h);
    return p != NULL ? pb_last_error(p->core) : "";
}

PBH_EXPORT int pbh_max_tasks(void) { return PB_MAX_TASKS; }
PBH_EXPORT int pbh_module_max(void) { return (int)PB_MODULE_MAX; }
PBH_EXPORT int pbh_chunk_size(void) { return (int)PB_CHUNK_SIZE; }
