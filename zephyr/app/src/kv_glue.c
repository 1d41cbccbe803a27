/* The core's key-value store, and the agent's configuration, on Zephyr's settings subsystem.
 *
 * The core's keys live under pb/core/<key>; the agent's configuration (identity, broker,
 * credentials) under pb/cfg/<key>, written with the settings shell or by a provisioning tool.
 * The backend is whatever CONFIG_SETTINGS_* selects (NVS on the boards with flash).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <zephyr/kernel.h>
#include <zephyr/logging/log.h>
#include <zephyr/settings/settings.h>

#include "glue.h"

LOG_MODULE_REGISTER(pb_kv, CONFIG_PROPELLER_LOG_LEVEL);

#define KV_CORE_PREFIX "pb/core/"
#define KV_CFG_PREFIX "pb/cfg/"
#define KV_NAME_MAX 48

struct kv_read {
    void *buf;
    size_t cap;
    int len; /* value length, -ENOENT until found */
};

/* Called for the record at the requested name (key NULL or "") and for any below it, which
 * are not ours to read. */
static int kv_read_one(const char *key, size_t len, settings_read_cb read_cb, void *cb_arg,
                       void *param)
{
    struct kv_read *r = param;

    if (key != NULL && key[0] != '\0') {
        return 0;
    }
    if (len == 0) {
        /* A deleted record. */
        r->len = -ENOENT;
        return 1;
    }
    size_t want = len < r->cap ? len : r->cap;
    ssize_t got = want > 0 ? read_cb(cb_arg, r->buf, want) : 0;

    r->len = got < 0 ? (int)got : (int)len;
    return 1;
}

static int kv_load(const char *name, void *buf, size_t cap)
{
    struct kv_read r = {.buf = buf, .cap = cap, .len = -ENOENT};
    int rc = settings_load_subtree_direct(name, kv_read_one, &r);

    return rc != 0 ? rc : r.len;
}

static int kv_name(char *out, const char *prefix, const char *key)
{
    int n = snprintf(out, KV_NAME_MAX, "%s%s", prefix, key);

    return (n < 0 || n >= KV_NAME_MAX) ? -ENAMETOOLONG : 0;
}

int kv_glue_init(void)
{
    int rc = settings_subsys_init();

    if (rc != 0) {
        LOG_WRN("settings unavailable (%d): nothing persists across reboots", rc);
    }
    return rc;
}

int kv_glue_get(void *ctx, const char *key, void *buf, size_t len)
{
    char name[KV_NAME_MAX];

    ARG_UNUSED(ctx);
    if (kv_name(name, KV_CORE_PREFIX, key) != 0) {
        return -ENAMETOOLONG;
    }
    return kv_load(name, buf, len);
}

int kv_glue_set(void *ctx, const char *key, const void *buf, size_t len)
{
    char name[KV_NAME_MAX];

    ARG_UNUSED(ctx);
    if (kv_name(name, KV_CORE_PREFIX, key) != 0) {
        return -ENAMETOOLONG;
    }
    if (len == 0) {
        return settings_delete(name);
    }
    return settings_save_one(name, buf, len);
}

/* One configuration string from pb/cfg/<key>, NUL-terminated. Returns its length, or a
 * negative value when it is absent, empty or does not fit (the caller keeps its default). */
int kv_glue_config(const char *key, char *out, size_t cap)
{
    char name[KV_NAME_MAX];

    if (cap < 2 || kv_name(name, KV_CFG_PREFIX, key) != 0) {
        return -EINVAL;
    }
    int n = kv_load(name, out, cap);

    if (n < 0) {
        return n;
    }
    if ((size_t)n >= cap) {
        LOG_WRN("setting %s is %d bytes, longer than %u: ignored", name, n, (unsigned)(cap - 1));
        return -ENOSPC;
    }
    /* The settings shell stores strings with or without their NUL. */
    out[n] = '\0';
    n = (int)strlen(out);
    return n > 0 ? n : -ENOENT;
}
