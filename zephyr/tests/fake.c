/* The recording platform of the tests and the fuzz target. */
#include "fake.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fake fake;
const char *fake_digest_hex = "306efd79979ee5c25ea21c01e1c86d1afa2fd04188bb7e007e46255f22d6fe49";
static uint64_t arena[(PB_ARENA_BYTES + 7) / 8];

static int64_t f_now(void *ctx)
{
    (void)ctx;
    return fake.now;
}

static int64_t f_wall(void *ctx)
{
    (void)ctx;
    return fake.wall;
}

static int f_publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos,
                     bool retain)
{
    (void)ctx;
    if (fake.nmsgs == FAKE_MSGS) /* keep the latest */
        memmove(&fake.msgs[0], &fake.msgs[1], sizeof fake.msgs[0] * (FAKE_MSGS - 1)), fake.nmsgs--;
    struct fake_msg *m = &fake.msgs[fake.nmsgs++];
    snprintf(m->topic, sizeof m->topic, "%s", topic);
    m->len = len;
    if (len > FAKE_PAYLOAD)
        len = FAKE_PAYLOAD;
    memcpy(m->payload, payload, len);
    m->payload[len] = 0;
    m->qos = qos;
    m->retain = retain;
    return 0;
}

static int f_subscribe(void *ctx, const char *filter, int qos)
{
    (void)ctx;
    (void)qos;
    if (fake.nsubs < 8)
        snprintf(fake.subs[fake.nsubs++], PB_TOPIC_MAX, "%s", filter);
    return 0;
}

static int f_start(void *ctx, int slot, const uint8_t *module, size_t len, const char *function,
                   int argc, const int64_t *args, const struct pb_limits *limits)
{
    (void)ctx;
    if (fake.nstarts < 64) {
        struct fake_start *s = &fake.starts[fake.nstarts++];
        s->slot = slot;
        s->module = module;
        s->len = len;
        snprintf(s->function, sizeof s->function, "%s", function);
        s->argc = argc;
        memcpy(s->args, args, sizeof(int64_t) * (size_t)argc);
        s->limits = *limits;
    }
    if (fake.start_rc != 0)
        return fake.start_rc;
    if (fake.finish_at_once)
        pb_task_finished(fake.core, slot, PB_RUN_OK, 1, 7, NULL);
    return 0;
}

static void f_stop(void *ctx, int slot)
{
    (void)ctx;
    if (fake.nstops < 64)
        fake.stops[fake.nstops++] = slot;
    if (fake.stop_at_once)
        pb_task_finished(fake.core, slot, PB_RUN_STOPPED, 0, 0, "stopped");
}

static int kv_find(const char *key)
{
    for (int i = 0; i < FAKE_KV; i++)
        if (fake.kv_lens[i] > 0 && strcmp(fake.kv_keys[i], key) == 0)
            return i;
    return -1;
}

static int f_kv_get(void *ctx, const char *key, void *buf, size_t len)
{
    (void)ctx;
    int i = kv_find(key);
    if (i < 0)
        return -1;
    size_t n = (size_t)fake.kv_lens[i] < len ? (size_t)fake.kv_lens[i] : len;
    memcpy(buf, fake.kv_values[i], n);
    return fake.kv_lens[i];
}

static int f_kv_set(void *ctx, const char *key, const void *buf, size_t len)
{
    (void)ctx;
    int i = kv_find(key);
    if (len == 0) {
        if (i >= 0)
            fake.kv_lens[i] = 0;
        return 0;
    }
    if (len > sizeof fake.kv_values[0] || strlen(key) > 23)
        return -1;
    if (i < 0)
        for (i = 0; i < FAKE_KV && fake.kv_lens[i] > 0; i++)
            ;
    if (i == FAKE_KV)
        return -1;
    snprintf(fake.kv_keys[i], sizeof fake.kv_keys[i], "%s", key);
    memcpy(fake.kv_values[i], buf, len);
    fake.kv_lens[i] = (int)len;
    return 0;
}

static void f_log(void *ctx, int level, const char *msg)
{
    (void)ctx;
    snprintf(fake.last_log, sizeof fake.last_log, "%s", msg);
    if (level <= PB_LOG_WARN)
        fake.warnings++;
    if (!fake.quiet && getenv("PB_VERBOSE") != NULL)
        fprintf(stderr, "log %d: %s\n", level, msg);
}

void fake_reset(bool clear_kv)
{
    char keys[FAKE_KV][24];
    static uint8_t values[FAKE_KV][512];
    int lens[FAKE_KV];
    memcpy(keys, fake.kv_keys, sizeof keys);
    memcpy(values, fake.kv_values, sizeof values);
    memcpy(lens, fake.kv_lens, sizeof lens);
    memset(&fake, 0, sizeof fake);
    if (!clear_kv) {
        memcpy(fake.kv_keys, keys, sizeof keys);
        memcpy(fake.kv_values, values, sizeof values);
        memcpy(fake.kv_lens, lens, sizeof lens);
    }
    fake.now = 1000;
    fake.wall = 1796416659000;
    struct pb_platform *p = &fake.platform;
    p->now_ms = f_now;
    p->wall_ms = f_wall;
    p->publish = f_publish;
    p->subscribe = f_subscribe;
    p->wasm_start = f_start;
    p->wasm_stop = f_stop;
    p->kv_get = f_kv_get;
    p->kv_set = f_kv_set;
    p->log = f_log;
}

pb_core *fake_core_with(const struct pb_identity *identity)
{
    fake.core = pb_init(arena, sizeof arena, &fake.platform, identity);
    return fake.core;
}

pb_core *fake_core(void)
{
    static const struct pb_label labels[] = {{"zone", "a"}, {"mcu", "nrf5340"}};
    struct pb_identity id = {
        .proplet_id = "board-7",
        .labels = labels,
        .label_count = 2,
        .heartbeat_ms = 2500,
        .version = "0.1.0",
    };
    return fake_core_with(&id);
}

void fake_connect(void) { pb_on_connect(fake.core); }

int fake_deliver(const char *suffix, const void *payload, size_t len)
{
    char topic[PB_TOPIC_MAX];
    snprintf(topic, sizeof topic, "m/default/c/default/proplets/board-7/%s", suffix);
    return pb_message(fake.core, topic, payload, len);
}

int fake_deliver_str(const char *suffix, const char *payload)
{
    return fake_deliver(suffix, payload, strlen(payload));
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

const struct fake_msg *fake_last(const char *suffix)
{
    for (int i = fake.nmsgs - 1; i >= 0; i--)
        if (ends_with(fake.msgs[i].topic, suffix))
            return &fake.msgs[i];
    return NULL;
}

int fake_count(const char *suffix)
{
    int n = 0;
    for (int i = 0; i < fake.nmsgs; i++)
        n += ends_with(fake.msgs[i].topic, suffix);
    return n;
}

void fake_clear_msgs(void) { fake.nmsgs = 0; }

const char *fake_state(void)
{
    const struct fake_msg *m = fake_last("/state");
    return m != NULL ? m->payload : "";
}

void fake_digest(const uint8_t *data, size_t len, char hex[65])
{
    uint8_t d[32];
    pb_sha256(data, len, d);
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", d[i]);
}

int fake_offer(const char *hex, size_t size, uint32_t chunk_size)
{
    char suffix[128], body[256];
    snprintf(suffix, sizeof suffix, "artifacts/%s/offer", hex);
    snprintf(body, sizeof body,
             "{\"digest\":\"sha256:%s\",\"size\":%zu,\"chunk_size\":%u,\"chunks\":%zu}", hex, size,
             chunk_size, (size + chunk_size - 1) / chunk_size);
    return fake_deliver_str(suffix, body);
}

int fake_chunk(const char *hex, uint32_t index, const uint8_t *data, size_t len)
{
    char suffix[128];
    snprintf(suffix, sizeof suffix, "artifacts/%s/%u", hex, index);
    return fake_deliver(suffix, data, len);
}

void fake_serve(const char *hex, const uint8_t *data, size_t len)
{
    const struct fake_msg *req = NULL;
    for (int i = fake.nmsgs - 1; i >= 0 && req == NULL; i--)
        if (strstr(fake.msgs[i].topic, "/artifacts/request") != NULL &&
            strstr(fake.msgs[i].payload, hex) != NULL)
            req = &fake.msgs[i];
    if (req == NULL)
        return;
    const char *cs = strstr(req->payload, "\"chunk_size\":");
    uint32_t chunk_size = cs != NULL ? (uint32_t)strtoul(cs + 13, NULL, 10) : PB_CHUNK_SIZE;
    char payload[FAKE_PAYLOAD + 1];
    memcpy(payload, req->payload, sizeof payload); /* serving publishes more messages */
    fake_offer(hex, len, chunk_size);
    size_t count = (len + chunk_size - 1) / chunk_size;
    const char *list = strstr(payload, "\"chunks\":[");
    if (list == NULL) {
        for (size_t i = 0; i < count; i++) {
            size_t n = i == count - 1 ? len - i * chunk_size : chunk_size;
            fake_chunk(hex, (uint32_t)i, data + i * chunk_size, n);
        }
        return;
    }
    const char *p = list + 10;
    while (*p != ']' && *p != 0) {
        char *end;
        unsigned long i = strtoul(p, &end, 10);
        if (i < count) {
            size_t n = i == count - 1 ? len - i * chunk_size : chunk_size;
            fake_chunk(hex, (uint32_t)i, data + i * chunk_size, n);
        }
        p = *end == ',' ? end + 1 : end;
    }
}

long fake_fixture(const char *name, char *buf, size_t cap)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", PB_FIXTURES, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = 0;
    return (long)n;
}

int fake_desired_one(char *buf, size_t cap, int64_t generation, const char *name,
                     const char *spec_hash, const char *hex, size_t size, const char *extra)
{
    return snprintf(buf, cap,
                    "{\"generation\":%lld,\"tasks\":[{\"name\":\"%s\",\"spec_hash\":\"%s\","
                    "\"owner\":\"propctl\",\"digest\":\"sha256:%s\",\"size\":%zu%s%s}]}",
                    (long long)generation, name, spec_hash, hex, size, extra[0] ? "," : "",
                    extra);
}
