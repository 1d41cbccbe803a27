/* Module buffers and chunked artifact transfer, requester side.
 *
 * Each buffer holds one module by digest: free, wanted (requested, no offer yet), filling
 * (offer taken, chunks arriving in any order, a bitmap of those received) or ready (verified).
 * Chunks stream straight into the buffer at their offset. A buffer a running task uses is never
 * written: only free, wanted and filling buffers take data, and runs start from ready ones.
 */
#include <string.h>

#include "internal.h"

bool pb_bit(const uint8_t *map, uint32_t i) { return (map[i >> 3] >> (i & 7) & 1u) != 0; }
static void set_bit(uint8_t *map, uint32_t i) { map[i >> 3] |= (uint8_t)(1u << (i & 7)); }
static void clear_bit(uint8_t *map, uint32_t i) { map[i >> 3] &= (uint8_t)~(1u << (i & 7)); }

static int64_t backoff(unsigned attempt)
{
    int64_t delay = PB_BACKOFF_INITIAL_MS;
    for (unsigned i = 1; i < attempt && delay < PB_BACKOFF_MAX_MS; i++)
        delay *= 2;
    return delay < PB_BACKOFF_MAX_MS ? delay : PB_BACKOFF_MAX_MS;
}

int pb_module_find(pb_core *c, const uint8_t digest[32])
{
    for (int m = 0; m < PB_MODULE_SLOTS; m++)
        if (c->modules[m].state != PB_MOD_FREE && memcmp(c->modules[m].digest, digest, 32) == 0)
            return m;
    return -1;
}

bool pb_module_pinned(const pb_core *c, int m)
{
    for (int i = 0; i < PB_MAX_TASKS; i++)
        if (c->runs[i].busy && c->runs[i].module == m)
            return true;
    return false;
}

static bool wanted(const pb_core *c, int m)
{
    for (int i = 0; i < PB_MAX_TASKS; i++)
        if (pb_task_wants_module(&c->tasks[i]) &&
            memcmp(c->tasks[i].spec.digest, c->modules[m].digest, 32) == 0)
            return true;
    return false;
}

int pb_module_claim(pb_core *c, const uint8_t digest[32])
{
    int pick = -1;
    for (int m = 0; m < PB_MODULE_SLOTS && pick < 0; m++)
        if (c->modules[m].state == PB_MOD_FREE)
            pick = m;
    /* Otherwise reuse a buffer no task needs any more (a cached module, a dropped transfer). */
    for (int m = 0; m < PB_MODULE_SLOTS && pick < 0; m++)
        if (!pb_module_pinned(c, m) && !wanted(c, m))
            pick = m;
    if (pick < 0)
        return -1;
    struct pb_module *mod = &c->modules[pick];
    memset(mod, 0, sizeof *mod);
    mod->state = PB_MOD_WANT;
    memcpy(mod->digest, digest, 32);
    return pick;
}

/* Tasks that wait for module m, one at a time: returns the next index after `from`, or -1. */
static int next_waiting(const pb_core *c, int m, int from)
{
    for (int i = from + 1; i < PB_MAX_TASKS; i++) {
        const struct pb_task *t = &c->tasks[i];
        if (pb_task_wants_module(t) && t->run < 0 &&
            memcmp(t->spec.digest, c->modules[m].digest, 32) == 0)
            return i;
    }
    return -1;
}

static void set_reason(pb_core *c, struct pb_task *t, const char *reason)
{
    if (t->state != PB_PENDING || strcmp(t->reason, reason) != 0) {
        t->state = PB_PENDING;
        pb_copy(t->reason, sizeof t->reason, reason);
        c->dirty = true;
    }
}

static void digest_text(char *buf, size_t cap, const uint8_t digest[32])
{
    struct pb_out o;
    pb_out_init(&o, buf, cap);
    pb_out_raw(&o, "sha256:");
    pb_out_hex(&o, digest, 32);
    pb_out_end(&o);
}

void pb_module_request(pb_core *c, int m, bool resume)
{
    struct pb_module *mod = &c->modules[m];
    uint32_t list[PB_REQUEST_WINDOW];
    int n = 0;
    bool listed = false;
    uint32_t chunk_size = PB_CHUNK_SIZE;
    const char *image = NULL;
    uint64_t size = 0;
    for (int i = next_waiting(c, m, -1); i >= 0; i = next_waiting(c, m, i)) {
        if (image == NULL && c->tasks[i].spec.image[0] != 0)
            image = c->tasks[i].spec.image;
        if (size == 0)
            size = c->tasks[i].spec.size;
    }
    if (mod->attempts < 250)
        mod->attempts++;
    mod->next_try = c->now + backoff(mod->attempts);
    memset(mod->asked, 0, sizeof mod->asked);
    if (resume && mod->state == PB_MOD_FILL) {
        /* Resume: only what is missing, one window at a time. */
        chunk_size = mod->chunk_size;
        for (uint32_t i = 0; i < mod->count && n < PB_REQUEST_WINDOW; i++)
            if (!pb_bit(mod->have, i))
                list[n++] = i;
        listed = true;
        mod->progress = c->now;
    } else if (size > (uint64_t)PB_CHUNK_SIZE * PB_REQUEST_WINDOW) {
        /* A large module in small chunks: the first window only, so the broker's queue for
         * this client is never flooded. */
        for (; n < PB_REQUEST_WINDOW; n++)
            list[n] = (uint32_t)n;
        listed = true;
    }
    for (int i = 0; i < n; i++)
        set_bit(mod->asked, list[i]);
    mod->windowed = listed;
    mod->outstanding = (uint16_t)n;
    if (pb_topic_request(&c->ident, c->topic, sizeof c->topic) >= 0) {
        int len = pb_encode_request(&c->ident, mod->digest, chunk_size, listed ? list : NULL, n,
                                    image, c->out, sizeof c->out);
        pb_publish(c, c->topic, c->out, len, 1, false);
    }
    char reason[PB_REASON_LEN + 1] = "waiting for artifact ";
    char digest[72];
    digest_text(digest, sizeof digest, mod->digest);
    pb_append(reason, sizeof reason, digest);
    pb_append(reason, sizeof reason, " (request ");
    pb_append_i64(reason, sizeof reason, mod->attempts);
    pb_append(reason, sizeof reason, ")");
    for (int i = next_waiting(c, m, -1); i >= 0; i = next_waiting(c, m, i))
        if (!c->tasks[i].module_error)
            set_reason(c, &c->tasks[i], reason);
}

static void fail_waiting(pb_core *c, int m, const char *reason)
{
    for (int i = next_waiting(c, m, -1); i >= 0; i = next_waiting(c, m, i))
        pb_task_fail(c, &c->tasks[i], reason);
    c->modules[m].state = PB_MOD_FREE;
}

static void verify(pb_core *c, int m)
{
    struct pb_module *mod = &c->modules[m];
    uint8_t digest[32];
    const struct pb_platform *p = c->platform;
    if (p->sha256 == NULL || p->sha256(p->ctx, c->module_data[m], mod->size, digest) != 0)
        pb_sha256(c->module_data[m], mod->size, digest);
    char text[72];
    digest_text(text, sizeof text, mod->digest);
    if (memcmp(digest, mod->digest, 32) == 0) {
        mod->state = PB_MOD_READY;
        pb_log(c, PB_LOG_INFO, "artifact received and verified: ", text);
        return;
    }
    mod->mismatches++;
    if (mod->mismatches >= PB_DIGEST_ATTEMPTS) {
        char reason[PB_REASON_LEN + 1] = "digest mismatch: the content received for ";
        pb_append(reason, sizeof reason, text);
        pb_append(reason, sizeof reason, " did not match it ");
        pb_append_i64(reason, sizeof reason, mod->mismatches);
        pb_append(reason, sizeof reason, " times");
        pb_log(c, PB_LOG_ERROR, reason, NULL);
        fail_waiting(c, m, reason);
        return;
    }
    /* Throw it all away and start again: content is never used unverified. */
    pb_log(c, PB_LOG_WARN, "content does not match its digest; fetching again: ", text);
    mod->state = PB_MOD_WANT;
    mod->received = 0;
    memset(mod->have, 0, sizeof mod->have);
    mod->next_try = c->now + backoff(mod->attempts);
}

void pb_module_offer(pb_core *c, int m)
{
    struct pb_module *mod = &c->modules[m];
    struct pb_inbox *in = &c->in;
    char text[72];
    digest_text(text, sizeof text, mod->digest);
    if (in->has_error) {
        /* The server cannot provide it now: wait with that reason, ask again later. */
        char reason[PB_REASON_LEN + 1] = "artifact ";
        pb_append(reason, sizeof reason, text);
        pb_append(reason, sizeof reason, " unavailable: ");
        pb_append(reason, sizeof reason, in->error);
        pb_append(reason, sizeof reason, " (retrying)");
        mod->state = PB_MOD_WANT;
        mod->next_try = c->now + backoff(mod->attempts + 1u);
        for (int i = next_waiting(c, m, -1); i >= 0; i = next_waiting(c, m, i)) {
            c->tasks[i].module_error = true;
            set_reason(c, &c->tasks[i], reason);
        }
        return;
    }
    if (in->size > PB_MODULE_MAX || (uint64_t)in->chunks > (uint64_t)(PB_BITMAP_BYTES - 1) * 8) {
        char reason[PB_REASON_LEN + 1] = "module of ";
        pb_append_i64(reason, sizeof reason, in->size);
        pb_append(reason, sizeof reason, " bytes");
        if (in->size <= PB_MODULE_MAX) {
            pb_append(reason, sizeof reason, " offered in chunks smaller than ");
            pb_append_i64(reason, sizeof reason, PB_MIN_CHUNK);
            pb_append(reason, sizeof reason, " bytes");
        } else {
            pb_append(reason, sizeof reason, " is larger than this board's module buffer of ");
            pb_append_i64(reason, sizeof reason, PB_MODULE_MAX);
            pb_append(reason, sizeof reason, " bytes");
        }
        fail_waiting(c, m, reason);
        return;
    }
    for (int i = next_waiting(c, m, -1); i >= 0; i = next_waiting(c, m, i))
        c->tasks[i].module_error = false;
    mod->progress = c->now;
    if (mod->state == PB_MOD_FILL && mod->size == (uint32_t)in->size &&
        mod->chunk_size == (uint32_t)in->chunk_size)
        return; /* an answer to a resume: keep what arrived */
    mod->state = PB_MOD_FILL;
    mod->size = (uint32_t)in->size;
    mod->chunk_size = (uint32_t)in->chunk_size;
    mod->count = (uint32_t)in->chunks;
    mod->received = 0;
    memset(mod->have, 0, sizeof mod->have);
    if (mod->chunk_size != PB_CHUNK_SIZE) {
        /* The window asked for was in other units: let the stall timer ask again. */
        memset(mod->asked, 0, sizeof mod->asked);
        mod->windowed = false;
        mod->outstanding = 0;
    }
    if (mod->count == 0)
        verify(c, m);
}

static uint32_t chunk_length(const struct pb_module *mod, uint32_t index)
{
    return index == mod->count - 1 ? mod->size - index * mod->chunk_size : mod->chunk_size;
}

bool pb_module_chunk_begin(pb_core *c, int m, uint32_t index, size_t len)
{
    const struct pb_module *mod = &c->modules[m];
    if (index >= mod->count || len != chunk_length(mod, index))
        return false;
    c->in.module = (int8_t)m;
    c->in.index = index;
    c->in.offset = 0;
    return true;
}

void pb_module_chunk_data(pb_core *c, const uint8_t *data, size_t len)
{
    struct pb_inbox *in = &c->in;
    const struct pb_module *mod = &c->modules[in->module];
    /* A duplicate leaves the first copy alone: it may be the only complete one. A buffer that
     * changed hands meanwhile (a tick between slices) takes nothing. */
    if (mod->state == PB_MOD_FILL && !pb_bit(mod->have, in->index))
        memcpy(c->module_data[in->module] + (size_t)in->index * mod->chunk_size + in->offset,
               data, len);
    in->offset += (uint32_t)len;
}

void pb_module_chunk_end(pb_core *c)
{
    int m = c->in.module;
    struct pb_module *mod = &c->modules[m];
    uint32_t index = c->in.index;
    if (mod->state != PB_MOD_FILL || index >= mod->count)
        return;
    mod->progress = c->now;
    mod->attempts = 0;
    mod->next_try = c->now; /* progress: a later stall asks again without the old backoff */
    if (pb_bit(mod->have, index))
        return;
    set_bit(mod->have, index);
    mod->received++;
    if (pb_bit(mod->asked, index)) {
        clear_bit(mod->asked, index);
        mod->outstanding--;
    }
    if (mod->received == mod->count)
        verify(c, m);
    else if (mod->windowed && mod->outstanding == 0)
        pb_module_request(c, m, true); /* this window is in: ask for the next */
}

void pb_modules_tick(pb_core *c)
{
    pb_modules_drop_unwanted(c);
    for (int m = 0; m < PB_MODULE_SLOTS; m++) {
        struct pb_module *mod = &c->modules[m];
        if (mod->state == PB_MOD_WANT && c->now >= mod->next_try)
            pb_module_request(c, m, false);
        else if (mod->state == PB_MOD_FILL && c->now - mod->progress >= PB_STALL_MS &&
                 c->now >= mod->next_try)
            pb_module_request(c, m, true);
    }
}

void pb_modules_drop_unwanted(pb_core *c)
{
    for (int m = 0; m < PB_MODULE_SLOTS; m++) {
        uint8_t state = c->modules[m].state;
        if ((state == PB_MOD_WANT || state == PB_MOD_FILL) && !wanted(c, m))
            c->modules[m].state = PB_MOD_FREE;
    }
}

void pb_modules_resend(pb_core *c)
{
    pb_modules_drop_unwanted(c);
    for (int m = 0; m < PB_MODULE_SLOTS; m++) {
        uint8_t state = c->modules[m].state;
        if (state == PB_MOD_WANT || state == PB_MOD_FILL)
            pb_module_request(c, m, state == PB_MOD_FILL);
    }
}

int64_t pb_modules_deadline(const pb_core *c, int64_t deadline)
{
    for (int m = 0; m < PB_MODULE_SLOTS; m++) {
        const struct pb_module *mod = &c->modules[m];
        int64_t at = mod->next_try;
        if (mod->state == PB_MOD_FILL && mod->progress + PB_STALL_MS > at)
            at = mod->progress + PB_STALL_MS;
        if ((mod->state == PB_MOD_WANT || mod->state == PB_MOD_FILL) && at < deadline)
            deadline = at;
    }
    return deadline;
}
