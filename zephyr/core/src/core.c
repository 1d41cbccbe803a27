/* The board core's state machine: identity, session events, converging the task table to the
 * desired set, starting and ending runs, daemon restarts, timeouts, persistence through kv,
 * heartbeats and the reported state. Behaviour follows proplet/agent.py. */
#include <string.h>

#include "internal.h"

_Static_assert(sizeof(struct pb_core) <= PB_ARENA_BYTES, "PB_ARENA_BYTES is too small");

size_t pb_arena_size(void) { return sizeof(struct pb_core); }

/* ---- small services ---- */

void pb_log(pb_core *c, int level, const char *a, const char *b)
{
    const struct pb_platform *p = c->platform;
    if (p->log == NULL)
        return;
    char line[192];
    pb_copy(line, sizeof line, a);
    if (b != NULL)
        pb_append(line, sizeof line, b);
    p->log(p->ctx, level, line);
}

int64_t pb_wall(pb_core *c)
{
    const struct pb_platform *p = c->platform;
    int64_t wall = p->wall_ms != NULL ? p->wall_ms(p->ctx) : -1;
    return wall < 0 ? -1 : wall;
}

void pb_publish(pb_core *c, const char *topic, const char *payload, int len, int qos, bool retain)
{
    if (len < 0) {
        pb_log(c, PB_LOG_ERROR, "message larger than PB_OUT_MAX not sent on ", topic);
        return;
    }
    if (!c->connected)
        return;
    const struct pb_platform *p = c->platform;
    if (p->publish(p->ctx, topic, (const uint8_t *)payload, (size_t)len, qos, retain) != 0)
        pb_log(c, PB_LOG_WARN, "publish failed on ", topic);
}

static int task_index(const pb_core *c, const struct pb_task *t) { return (int)(t - c->tasks); }

bool pb_task_wants_module(const struct pb_task *t) { return t->used && !t->finished; }

void pb_task_fail(pb_core *c, struct pb_task *t, const char *reason)
{
    t->state = PB_FAILED;
    t->finished = true;
    t->module_error = false;
    pb_copy(t->reason, sizeof t->reason, reason);
    c->dirty = true;
}

static void set_pending(pb_core *c, struct pb_task *t, const char *reason)
{
    if (t->state != PB_PENDING || strcmp(t->reason, reason) != 0) {
        t->state = PB_PENDING;
        pb_copy(t->reason, sizeof t->reason, reason);
        c->dirty = true;
    }
}

/* ---- persistence: one kv record per one-shot task ---- */

static void record_key(char key[24], const char *name)
{
    uint8_t h[32];
    pb_sha256((const uint8_t *)name, strlen(name), h);
    struct pb_out o;
    pb_out_init(&o, key, 24);
    pb_out_raw(&o, "pbt");
    pb_out_hex(&o, h, 8);
    pb_out_end(&o);
}

static void record_save(pb_core *c, const struct pb_task *t)
{
    const struct pb_platform *p = c->platform;
    if (p->kv_set == NULL || t->spec.daemon)
        return;
    struct pb_record *r = &c->record;
    memset(r, 0, sizeof *r);
    r->magic = PB_RECORD_MAGIC;
    r->state = t->state;
    r->has_result = t->has_result;
    r->runs = t->runs;
    r->restarts = t->restarts;
    r->started_ms = t->started_ms;
    r->finished_ms = t->finished_ms;
    memcpy(r->spec_hash, t->spec.spec_hash, sizeof r->spec_hash);
    memcpy(r->result, t->result, sizeof r->result);
    memcpy(r->reason, t->reason, sizeof r->reason);
    char key[24];
    record_key(key, t->spec.name);
    if (p->kv_set(p->ctx, key, r, sizeof *r) != 0)
        pb_log(c, PB_LOG_WARN, "could not persist the state of task ", t->spec.name);
}

static void record_forget(pb_core *c, const char *name)
{
    const struct pb_platform *p = c->platform;
    if (p->kv_set == NULL)
        return;
    char key[24];
    record_key(key, name);
    p->kv_set(p->ctx, key, NULL, 0);
}

/* The record of this task's spec, or NULL. */
static const struct pb_record *record_load(pb_core *c, const struct pb_spec *s)
{
    const struct pb_platform *p = c->platform;
    if (p->kv_get == NULL)
        return NULL;
    struct pb_record *r = &c->record;
    char key[24];
    record_key(key, s->name);
    memset(r, 0, sizeof *r);
    if (p->kv_get(p->ctx, key, r, sizeof *r) != (int)sizeof *r || r->magic != PB_RECORD_MAGIC ||
        r->state > PB_STOPPED)
        return NULL;
    r->spec_hash[sizeof r->spec_hash - 1] = 0;
    r->result[sizeof r->result - 1] = 0;
    r->reason[sizeof r->reason - 1] = 0;
    pb_utf8_trim(r->result);
    pb_utf8_trim(r->reason);
    return strcmp(r->spec_hash, s->spec_hash) == 0 ? r : NULL;
}

/* ---- init and identity ---- */

static bool segment(const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n < 1 || n > PB_ID_LEN)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
        if (!alnum && (i == 0 || (ch != '.' && ch != '_' && ch != '-')))
            return false;
    }
    return true;
}

static bool fits(const char *s, size_t cap) { return s != NULL && strlen(s) < cap; }

pb_core *pb_init(void *arena, size_t len, const struct pb_platform *platform,
                 const struct pb_identity *identity)
{
    if (arena == NULL || ((uintptr_t)arena & 7u) != 0 || len < sizeof(struct pb_core) ||
        platform == NULL || identity == NULL || platform->now_ms == NULL ||
        platform->publish == NULL || platform->subscribe == NULL ||
        platform->wasm_start == NULL || platform->wasm_stop == NULL)
        return NULL;
    const char *domain = identity->domain != NULL ? identity->domain : "default";
    const char *channel = identity->channel != NULL ? identity->channel : "default";
    const char *version = identity->version != NULL ? identity->version : PB_VERSION_DEFAULT;
    if (!segment(identity->proplet_id) || !segment(domain) || !segment(channel) ||
        !fits(version, PB_VERSION_LEN + 1) || identity->label_count < 0 ||
        identity->label_count > PB_LABELS_MAX ||
        (identity->label_count > 0 && identity->labels == NULL))
        return NULL;
    for (int i = 0; i < identity->label_count; i++)
        if (!fits(identity->labels[i].key, PB_LABEL_KEY_LEN + 1) ||
            !fits(identity->labels[i].value, PB_LABEL_VALUE_LEN + 1))
            return NULL;
    pb_core *c = arena;
    memset(c, 0, sizeof *c);
    c->platform = platform;
    struct pb_ident *id = &c->ident;
    pb_copy(id->id, sizeof id->id, identity->proplet_id);
    pb_copy(id->domain, sizeof id->domain, domain);
    pb_copy(id->channel, sizeof id->channel, channel);
    pb_copy(id->version, sizeof id->version, version);
    id->label_count = (uint8_t)identity->label_count;
    for (int i = 0; i < identity->label_count; i++) {
        pb_copy(id->label_keys[i], sizeof id->label_keys[i], identity->labels[i].key);
        pb_copy(id->label_values[i], sizeof id->label_values[i], identity->labels[i].value);
    }
    id->heartbeat_ms = identity->heartbeat_ms != 0 ? identity->heartbeat_ms : 5000;
    int n = pb_topic(id, c->root, sizeof c->root, NULL, NULL);
    c->root_len = n > 0 ? (size_t)n : 0;
    for (int i = 0; i < PB_MAX_TASKS; i++) {
        c->tasks[i].run = -1;
        c->runs[i].task = -1;
    }
    return c;
}

int pb_will(const pb_core *c, char *topic, size_t topic_cap, char *payload, size_t payload_cap)
{
    if (pb_topic(&c->ident, topic, topic_cap, "presence", NULL) < 0)
        return PB_E_NOSPACE;
    int n = pb_encode_presence(&c->ident, false, payload, payload_cap);
    return n < 0 ? PB_E_NOSPACE : n;
}

/* ---- reporting ---- */

static void publish_state(pb_core *c)
{
    c->dirty = false;
    if (!c->connected)
        return;
    static const char *not_placed = "not placed: the task table holds ";
    char reason[112];
    pb_append_i64(pb_copy(reason, sizeof reason, not_placed), sizeof reason, PB_MAX_TASKS);
    pb_append(reason, sizeof reason, " tasks");
    if (c->unplaced_lost > 0) {
        /* Too many to list one by one: say how many more, so none goes unreported. */
        pb_append_i64(pb_append(reason, sizeof reason, "; "), sizeof reason, c->unplaced_lost);
        pb_append(reason, sizeof reason, " more tasks not placed are not listed");
    }
    int count = 0;
    for (int i = 0; i < PB_MAX_TASKS; i++) {
        const struct pb_task *t = &c->tasks[i];
        if (!t->used)
            continue;
        struct pb_status_view *v = &c->views[count++];
        v->name = t->spec.name;
        v->spec_hash = t->spec.spec_hash;
        v->owner = t->spec.owner;
        v->state = t->state;
        v->restarts = t->restarts;
        v->runs = t->runs;
        v->started_ms = t->started_ms;
        v->finished_ms = t->finished_ms;
        v->result = t->has_result ? t->result : NULL;
        v->reason = t->reason[0] != 0 ? t->reason : NULL;
    }
    for (int i = 0; i < c->unplaced_count; i++) {
        const struct pb_unplaced *u = &c->unplaced[i];
        struct pb_status_view *v = &c->views[count++];
        memset(v, 0, sizeof *v);
        v->name = u->name;
        v->spec_hash = u->spec_hash;
        v->owner = u->owner;
        v->state = PB_PENDING;
        v->started_ms = v->finished_ms = -1;
        v->reason = reason;
    }
    /* Sorted by name, as the Python agent reports them (insertion sort: a handful of rows). */
    for (int i = 1; i < count; i++) {
        struct pb_status_view v = c->views[i];
        int k = i;
        while (k > 0 && strcmp(c->views[k - 1].name, v.name) > 0) {
            c->views[k] = c->views[k - 1];
            k--;
        }
        c->views[k] = v;
    }
    int64_t ts = pb_wall(c);
    int len = pb_encode_state(&c->ident, c->generation, ts, c->views, count, false, c->out,
                              sizeof c->out);
    if (len < 0) {
        pb_log(c, PB_LOG_WARN, "reported state too large: sent without reasons and results",
               NULL);
        len = pb_encode_state(&c->ident, c->generation, ts, c->views, count, true, c->out,
                              sizeof c->out);
    }
    pb_topic(&c->ident, c->topic, sizeof c->topic, "state", NULL);
    pb_publish(c, c->topic, c->out, len, 1, true);
}

void pb_flush(pb_core *c)
{
    if (c->dirty)
        publish_state(c);
}

int pb_running(const pb_core *c)
{
    int n = 0;
    for (int i = 0; i < PB_MAX_TASKS; i++)
        n += c->runs[i].busy;
    return n;
}

int64_t pb_observed_generation(const pb_core *c) { return c->generation; }

const char *pb_last_error(const pb_core *c) { return c->last_error; }

static void heartbeat(pb_core *c)
{
    c->next_heartbeat = c->now + c->ident.heartbeat_ms;
    int len = pb_encode_heartbeat(&c->ident, ++c->heartbeat_seq, pb_wall(c), pb_running(c),
                                  c->generation, c->out, sizeof c->out);
    pb_topic(&c->ident, c->topic, sizeof c->topic, "heartbeat", NULL);
    pb_publish(c, c->topic, c->out, len, 0, false);
}

static void publish_result(pb_core *c, const struct pb_task *t)
{
    struct pb_result_view v = {
        .task = t->spec.name,
        .spec_hash = t->spec.spec_hash,
        .state = t->last_state,
        .runs = t->last_runs,
        .started_ms = t->last_started_ms,
        .finished_ms = t->last_finished_ms,
        .nresults = t->last_nresults,
        .result = t->last_value,
        .error = t->last_error[0] != 0 ? t->last_error : NULL,
    };
    int len = pb_encode_result(&c->ident, &v, c->out, sizeof c->out);
    pb_topic(&c->ident, c->topic, sizeof c->topic, "results/", t->spec.name);
    pb_publish(c, c->topic, c->out, len, 1, true);
}

/* ---- call nesting: platform callbacks may call back into the core ---- */

static void enter(pb_core *c, int64_t now)
{
    c->depth++;
    c->now = now;
}

static void leave(pb_core *c)
{
    if (--c->depth > 0) {
        c->again = true;
        return;
    }
    c->depth = 1; /* runs started below may end at once: those calls must not reschedule */
    for (int i = 0; i <= PB_MAX_TASKS; i++) {
        c->again = false;
        pb_schedule(c);
        if (!c->again)
            break;
    }
    c->depth = 0;
    pb_flush(c);
}

static int64_t now_ms(pb_core *c) { return c->platform->now_ms(c->platform->ctx); }

/* ---- runs ---- */

static void start(pb_core *c, struct pb_task *t, int m, int slot)
{
    const struct pb_platform *p = c->platform;
    struct pb_run *r = &c->runs[slot];
    uint32_t seq = ++c->run_seq;
    r->busy = true;
    r->stop = PB_STOP_NONE;
    r->task = (int8_t)task_index(c, t);
    r->module = (int8_t)m;
    r->seq = seq;
    r->started_mono = c->now;
    r->deadline = t->spec.limits.timeout_ms > 0 ? c->now + t->spec.limits.timeout_ms : 0;
    t->run = (int8_t)slot;
    t->runs++;
    t->started_ms = pb_wall(c);
    t->finished_ms = -1;
    t->state = PB_RUNNING;
    t->reason[0] = 0;
    t->restart_pending = false;
    c->dirty = true;
    record_save(c, t);
    int rc = p->wasm_start(p->ctx, slot, c->module_data[m], c->modules[m].size, t->spec.function,
                           t->spec.argc, t->spec.args, &t->spec.limits);
    if (rc != 0 && r->busy && r->seq == seq) {
        char error[48] = "the runtime could not start it (error ";
        pb_append(pb_append_i64(error, sizeof error, rc), sizeof error, ")");
        c->depth++;
        pb_task_finished(c, slot, PB_RUN_TRAP, 0, 0, error);
        c->depth--;
    }
}

static bool should_run(const pb_core *c, const struct pb_task *t)
{
    return t->used && !t->finished && t->run < 0 &&
           (!t->restart_pending || c->now >= t->restart_at);
}

void pb_schedule(pb_core *c)
{
    pb_modules_drop_unwanted(c);
    for (int i = 0; i < PB_MAX_TASKS; i++) {
        struct pb_task *t = &c->tasks[i];
        if (!should_run(c, t))
            continue;
        int m = pb_module_find(c, t->spec.digest);
        if (m < 0) {
            m = pb_module_claim(c, t->spec.digest);
            if (m < 0) {
                char reason[64] = "waiting for a module buffer (all ";
                pb_append_i64(reason, sizeof reason, PB_MODULE_SLOTS);
                set_pending(c, t, pb_append(reason, sizeof reason, " in use)"));
            } else {
                pb_module_request(c, m, false);
            }
            continue;
        }
        if (c->modules[m].state != PB_MOD_READY)
            continue;
        int slot = -1;
        for (int k = 0; k < PB_MAX_TASKS && slot < 0; k++)
            if (!c->runs[k].busy)
                slot = k;
        if (slot < 0) {
            char reason[64] = "waiting for a free slot (";
            pb_append_i64(reason, sizeof reason, PB_MAX_TASKS);
            set_pending(c, t, pb_append(reason, sizeof reason, " tasks running)"));
            continue;
        }
        start(c, t, m, slot);
    }
}

void pb_task_finished(pb_core *c, int slot, int status, int nresults, int64_t result,
                      const char *error)
{
    if (slot < 0 || slot >= PB_MAX_TASKS || !c->runs[slot].busy) {
        pb_log(c, PB_LOG_WARN, "a run ended in a slot that was not running", NULL);
        return;
    }
    enter(c, now_ms(c));
    struct pb_run *r = &c->runs[slot];
    r->busy = false;
    if (r->task < 0) { /* its task left or changed meanwhile: nothing to report */
        leave(c);
        return;
    }
    struct pb_task *t = &c->tasks[r->task];
    char text[PB_ERROR_LEN + 1];
    int state = status == PB_RUN_OK        ? PB_COMPLETED
                : status == PB_RUN_STOPPED ? PB_STOPPED
                                           : PB_FAILED;
    pb_copy(text, sizeof text, error != NULL ? error : "");
    if (r->stop == PB_STOP_TIMEOUT) {
        state = PB_FAILED;
        pb_append_i64(pb_copy(text, sizeof text, "timed out after "), sizeof text,
                      t->spec.limits.timeout_ms);
        pb_append(text, sizeof text, " ms");
    } else if (state != PB_COMPLETED && text[0] == 0) {
        pb_copy(text, sizeof text, state == PB_FAILED ? "trapped" : "stopped");
    } else if (state == PB_COMPLETED) {
        text[0] = 0;
    }
    int64_t finished = pb_wall(c);
    if (finished >= 0 && finished < t->started_ms)
        finished = t->started_ms;
    t->has_last = true;
    t->last_state = (uint8_t)state;
    t->last_nresults = (int8_t)(state == PB_COMPLETED ? (nresults > 0) : -1);
    t->last_value = result;
    t->last_runs = t->runs;
    t->last_started_ms = t->started_ms;
    t->last_finished_ms = finished;
    pb_copy(t->last_error, sizeof t->last_error, text);
    publish_result(c, t);

    t->run = -1;
    t->state = (uint8_t)state;
    t->finished_ms = finished;
    t->has_result = state == PB_COMPLETED;
    t->result[0] = 0;
    if (t->has_result && nresults > 0)
        pb_append_i64(t->result, sizeof t->result, result);
    pb_copy(t->reason, sizeof t->reason, text);
    if (t->spec.daemon) {
        /* Restart with backoff; a daemon that ran long enough starts over from the first step. */
        int64_t ran = c->now - r->started_mono;
        if (ran >= PB_DAEMON_HEALTHY_MS)
            t->failures_in_row = 0;
        else if (t->failures_in_row < 32)
            t->failures_in_row++;
        int64_t delay = PB_DAEMON_BACKOFF_INITIAL_MS;
        for (int i = 1; i < t->failures_in_row && delay < PB_DAEMON_BACKOFF_MAX_MS; i++)
            delay *= 2;
        if (delay > PB_DAEMON_BACKOFF_MAX_MS)
            delay = PB_DAEMON_BACKOFF_MAX_MS;
        t->restart_at = c->now + delay;
        t->restart_pending = true;
        t->restarts++;
        if (t->reason[0] == 0)
            pb_copy(t->reason, sizeof t->reason, "exited");
        pb_append(t->reason, sizeof t->reason, "; restarting in ");
        pb_append_i64(t->reason, sizeof t->reason, (delay + 500) / 1000);
        pb_append(t->reason, sizeof t->reason, "s");
    } else {
        t->finished = true;
        record_save(c, t);
    }
    c->dirty = true;
    leave(c);
}

/* ---- converging to a desired set ---- */

static void stop_run(pb_core *c, struct pb_task *t)
{
    int slot = t->run;
    if (slot < 0)
        return;
    t->run = -1;
    c->runs[slot].task = -1;
    c->runs[slot].stop = PB_STOP_ORPHAN;
    c->platform->wasm_stop(c->platform->ctx, slot);
}

static void bad_reason(const struct pb_spec *s, char *out, size_t cap)
{
    switch (s->bad) {
    case PB_BAD_NO_FUNCTION:
        pb_copy(out, cap, "no function given: a wamr board calls an exported function and "
                          "cannot run a WASI command");
        break;
    case PB_BAD_STDIN:
        pb_copy(out, cap, "stdin is not supported on a wamr board");
        break;
    case PB_BAD_ENV:
        pb_copy(out, cap, "env is not supported on a wamr board");
        break;
    case PB_BAD_FIELD:
        pb_copy(out, cap, "field '");
        pb_append(out, cap, s->bad_key);
        pb_append(out, cap, "' is not supported on a wamr board");
        break;
    case PB_BAD_TOO_LONG:
        pb_copy(out, cap, s->bad_key);
        pb_append(out, cap, " is longer than the ");
        pb_append_i64(out, cap, s->bad_index);
        pb_append(out, cap, " characters this board keeps");
        break;
    case PB_BAD_ARG:
        pb_copy(out, cap, "argument ");
        pb_append_i64(out, cap, s->bad_index + 1);
        pb_append(out, cap, " is not an integer: a wamr board passes int64 arguments");
        break;
    case PB_BAD_ARGS:
        pb_copy(out, cap, "more than ");
        pb_append_i64(out, cap, PB_ARGS_MAX);
        pb_append(out, cap, " arguments: this board passes at most ");
        pb_append_i64(out, cap, PB_ARGS_MAX);
        break;
    default: /* PB_BAD_SIZE */
        pb_copy(out, cap, "module of ");
        pb_append_i64(out, cap, (int64_t)s->size);
        pb_append(out, cap, " bytes is larger than this board's module buffer of ");
        pb_append_i64(out, cap, PB_MODULE_MAX);
        pb_append(out, cap, " bytes");
        break;
    }
}

static void place(pb_core *c, struct pb_task *t, const struct pb_spec *s)
{
    memset(t, 0, sizeof *t);
    t->spec = *s;
    t->used = true;
    t->run = -1;
    t->state = PB_PENDING;
    t->started_ms = t->finished_ms = -1;
    c->dirty = true;
    if (s->bad != PB_BAD_NONE) {
        char reason[PB_REASON_LEN + 1];
        bad_reason(s, reason, sizeof reason);
        pb_task_fail(c, t, reason);
        return;
    }
    const struct pb_record *r = s->daemon ? NULL : record_load(c, s);
    if (r == NULL)
        return;
    t->runs = r->runs;
    t->restarts = r->restarts;
    t->started_ms = r->started_ms;
    t->finished_ms = r->finished_ms;
    if (r->state == PB_RUNNING) {
        /* A run was cut short by a reboot: it runs again, counted as a restart. */
        t->restarts++;
        pb_copy(t->reason, sizeof t->reason, "interrupted by a restart; running again");
        return;
    }
    t->state = r->state;
    t->finished = true;
    t->has_result = r->has_result;
    memcpy(t->result, r->result, sizeof t->result);
    memcpy(t->reason, r->reason, sizeof t->reason);
}

static void remove_task(pb_core *c, struct pb_task *t)
{
    stop_run(c, t);
    pb_topic(&c->ident, c->topic, sizeof c->topic, "results/", t->spec.name);
    pb_publish(c, c->topic, "", 0, 1, true); /* clears the retained result */
    record_forget(c, t->spec.name);
    t->used = false;
    c->dirty = true;
}

void pb_commit(pb_core *c)
{
    struct pb_inbox *in = &c->in;
    char gen[24] = "";
    pb_append_i64(gen, sizeof gen, in->generation);
    if (in->generation < c->generation || (in->generation == c->generation)) {
        pb_log(c, PB_LOG_INFO, "ignored desired set generation ", gen);
        return;
    }
    uint64_t taken = 0; /* staged entries matched to a live task */
    for (int i = 0; i < PB_MAX_TASKS; i++) {
        struct pb_task *t = &c->tasks[i];
        if (!t->used)
            continue;
        int k = 0;
        while (k < in->staged_count && strcmp(in->staged[k].name, t->spec.name) != 0)
            k++;
        if (k == in->staged_count) {
            remove_task(c, t);
            continue;
        }
        taken |= 1ull << k;
        if (strcmp(in->staged[k].spec_hash, t->spec.spec_hash) != 0) {
            stop_run(c, t); /* a changed spec: the old run ends unreported, the new one starts */
            place(c, t, &in->staged[k]);
        } else {
            t->spec = in->staged[k];
        }
    }
    for (int k = 0; k < in->staged_count; k++) {
        if (taken & (1ull << k))
            continue;
        int i = 0;
        while (c->tasks[i].used) /* there is room: the table holds at most PB_MAX_TASKS staged */
            i++;
        place(c, &c->tasks[i], &in->staged[k]);
    }
    memcpy(c->unplaced, in->unplaced, sizeof c->unplaced);
    c->unplaced_count = in->unplaced_count;
    c->unplaced_lost = in->lost;
    if (in->lost > 0)
        pb_log(c, PB_LOG_WARN, "tasks beyond the table and its overflow list are counted, not named: "
                               "desired set generation ", gen);
    c->generation = in->generation;
    c->dirty = true;
    pb_log(c, PB_LOG_INFO, "applied desired set generation ", gen);
}

/* ---- API ---- */

void pb_on_connect(pb_core *c)
{
    enter(c, now_ms(c));
    const struct pb_platform *p = c->platform;
    c->connected = true;
    /* Only what it reads: its own announce, state and heartbeats would echo back under #. */
    pb_topic(&c->ident, c->topic, sizeof c->topic, "desired", NULL);
    if (p->subscribe(p->ctx, c->topic, 1) != 0)
        pb_log(c, PB_LOG_ERROR, "subscribe failed: ", c->topic);
    pb_topic(&c->ident, c->topic, sizeof c->topic, "artifacts/#", NULL);
    if (p->subscribe(p->ctx, c->topic, 1) != 0)
        pb_log(c, PB_LOG_ERROR, "subscribe failed: ", c->topic);
    pb_topic(&c->ident, c->topic, sizeof c->topic, "presence", NULL);
    pb_publish(c, c->topic, c->out, pb_encode_presence(&c->ident, true, c->out, sizeof c->out),
               1, true);
    pb_topic(&c->ident, c->topic, sizeof c->topic, "announce", NULL);
    pb_publish(c, c->topic, c->out, pb_encode_announce(&c->ident, c->out, sizeof c->out), 1,
               false);
    /* Retained results may have been lost with a broker restart: publish ours again. */
    for (int i = 0; i < PB_MAX_TASKS; i++)
        if (c->tasks[i].used && c->tasks[i].has_last)
            publish_result(c, &c->tasks[i]);
    pb_modules_resend(c);
    publish_state(c);
    heartbeat(c);
    leave(c);
}

void pb_on_disconnect(pb_core *c) { c->connected = false; }

void pb_message_begin(pb_core *c, const char *topic, size_t total_len)
{
    c->now = now_ms(c);
    pb_inbox_begin(c, topic != NULL ? topic : "", total_len);
}

void pb_message_data(pb_core *c, const uint8_t *data, size_t len)
{
    if (data != NULL && len > 0)
        pb_inbox_data(c, data, len);
}

int pb_message_end(pb_core *c)
{
    enter(c, now_ms(c));
    int r = pb_inbox_end(c);
    leave(c);
    return r;
}

int pb_message(pb_core *c, const char *topic, const uint8_t *payload, size_t len)
{
    pb_message_begin(c, topic, len);
    pb_message_data(c, payload, len);
    return pb_message_end(c);
}

void pb_tick(pb_core *c, int64_t now)
{
    enter(c, now);
    for (int slot = 0; slot < PB_MAX_TASKS; slot++) {
        struct pb_run *r = &c->runs[slot];
        if (r->busy && r->stop == PB_STOP_NONE && r->deadline != 0 && now >= r->deadline) {
            r->stop = PB_STOP_TIMEOUT;
            pb_log(c, PB_LOG_WARN, "run timed out: ", r->task >= 0 ? c->tasks[r->task].spec.name : "");
            c->platform->wasm_stop(c->platform->ctx, slot);
        }
    }
    pb_modules_tick(c);
    if (c->connected && now >= c->next_heartbeat)
        heartbeat(c);
    leave(c);
}

int64_t pb_next_deadline(const pb_core *c)
{
    int64_t at = c->connected ? c->next_heartbeat : c->now + c->ident.heartbeat_ms;
    for (int i = 0; i < PB_MAX_TASKS; i++) {
        const struct pb_run *r = &c->runs[i];
        if (r->busy && r->stop == PB_STOP_NONE && r->deadline != 0 && r->deadline < at)
            at = r->deadline;
        const struct pb_task *t = &c->tasks[i];
        if (t->used && !t->finished && t->run < 0 && t->restart_pending && t->restart_at < at)
            at = t->restart_at;
    }
    return pb_modules_deadline(c, at);
}
