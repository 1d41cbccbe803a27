/* The board core's API: a proplet with runtime "wamr", speaking the Propeller MQTT protocol.
 *
 * The core owns the protocol side of a board: it reads the retained desired set as it streams
 * in, keeps a task table of PB_MAX_TASKS entries, fetches modules in chunks into its module
 * buffers, starts and stops runs through the platform (platform.h), and publishes announce,
 * presence, heartbeat, reported state, task results and artifact requests. Its RAM is one
 * arena handed over by the caller; it never allocates and never recurses.
 *
 * Not thread-safe: the platform serialises all calls (see platform.h).
 *
 * Typical use:
 *     static uint8_t arena[PB_ARENA_BYTES] __attribute__((aligned(8)));
 *     pb_core *core = pb_init(arena, sizeof arena, &platform, &identity);
 *     pb_will(core, topic, sizeof topic, payload, sizeof payload);   // set as the MQTT will
 *     ... on CONNACK:        pb_on_connect(core);
 *     ... on each PUBLISH:   pb_message_begin(core, topic, total);
 *                            pb_message_data(core, slice, n);          // any number of times
 *                            pb_message_end(core);
 *     ... every 100 ms or so pb_tick(core, now_ms);
 *     ... when a run ends:   pb_task_finished(core, slot, PB_RUN_OK, 1, value, NULL);
 */
#ifndef PROPELLER_CORE_H
#define PROPELLER_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "propeller/config.h"
#include "propeller/platform.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pb_core pb_core;

struct pb_label {
    const char *key;
    const char *value;
};

/* Who the board is. Strings are copied by pb_init; ids follow the protocol (1-63 characters
 * of letters, digits, '.', '_' and '-', starting with a letter or digit). */
struct pb_identity {
    const char *proplet_id;
    const char *domain;  /* NULL: "default" */
    const char *channel; /* NULL: "default" */
    const struct pb_label *labels;
    int label_count; /* at most PB_LABELS_MAX */
    uint32_t heartbeat_ms; /* 0: 5000 */
    const char *version;   /* NULL: the core's own version */
};

/* How a run ended, for pb_task_finished. */
enum pb_run_status {
    PB_RUN_OK = 0,      /* the function returned; nresults (0 or 1) values in `result` */
    PB_RUN_TRAP = 1,    /* a trap or a load/instantiate error; `error` says what */
    PB_RUN_STOPPED = 2, /* ended by wasm_stop */
};

/* Return values of the calls that can fail. */
enum pb_status {
    PB_OK = 0,
    PB_E_ARG = -1,       /* bad argument: arena too small or misaligned, bad identity */
    PB_E_DROPPED = -2,   /* a message was malformed or unexpected and was dropped */
    PB_E_NOSPACE = -3,   /* an output buffer is too small */
};

/* Bytes of arena the core needs: the exact figure for this build. */
size_t pb_arena_size(void);

/* An upper bound of pb_arena_size(), usable as a static array size. pb_init checks it. */
#define PB_SPEC_BYTES_                                                                        \
    (64 + 81 + 64 + 32 + (PB_FUNCTION_LEN + 1) + (PB_IMAGE_LEN + 1) + (PB_JSON_KEY_LEN + 1) + \
     8 * PB_ARGS_MAX + 56)
#define PB_TASK_BYTES_                                                                        \
    (PB_SPEC_BYTES_ + (PB_RESULT_LEN + 1) + (PB_REASON_LEN + 1) + (PB_ERROR_LEN + 1) + 104)
#define PB_MODULE_BYTES_ (PB_MODULE_MAX + 2 * ((PB_MODULE_MAX / PB_MIN_CHUNK + 7) / 8 + 1) + 48)
#define PB_ARENA_BYTES                                                                        \
    (PB_MAX_TASKS * (PB_TASK_BYTES_ + PB_SPEC_BYTES_ + 112) + PB_MODULE_SLOTS * PB_MODULE_BYTES_ + \
     PB_UNPLACED_MAX * (2 * (64 + 81 + 64) + 80) + 2 * PB_SPEC_BYTES_ + PB_RESULT_LEN +        \
     2 * PB_REASON_LEN + 2 * PB_JSON_KEY_LEN + PB_ARG_LEN + 81 + PB_OUT_MAX + 2 * PB_TOPIC_MAX + \
     PB_LABELS_MAX * (PB_LABEL_KEY_LEN + PB_LABEL_VALUE_LEN + 2) + PB_VERSION_LEN + 4 * 64 +    \
     1024)

/* Set up a core inside `arena` (aligned to 8, at least pb_arena_size() bytes). Keeps the
 * platform pointer; copies the identity. Calls no platform callback. Returns NULL on a bad
 * argument (the reason is not logged: there is nowhere to log it yet). */
pb_core *pb_init(void *arena, size_t len, const struct pb_platform *platform,
                 const struct pb_identity *identity);

/* The MQTT last will to register before connecting: topic ".../presence" and payload
 * {"proplet":"ID","online":false}, both NUL-terminated; publish it retained at QoS 1.
 * Returns the payload length, or PB_E_NOSPACE. */
int pb_will(const pb_core *core, char *topic, size_t topic_cap, char *payload,
            size_t payload_cap);

/* The session is up (after CONNACK): subscribes (QoS 1) to proplets/{id}/desired and
 * proplets/{id}/artifacts/# (the board's own announce, state and heartbeats would echo back
 * under proplets/{id}/#), publishes presence online, announce, the last task results, the
 * reported state and a heartbeat, and asks again for the chunks still missing. */
void pb_on_connect(pb_core *core);
/* The session dropped: nothing is published until the next pb_on_connect. */
void pb_on_disconnect(pb_core *core);

/* One incoming message, fed as it streams in. `total_len` is the payload length announced
 * by the PUBLISH header. pb_message_data may be called any number of times with slices of any
 * size (including 0) whose lengths add up to total_len. pb_message_end returns PB_OK when
 * the message was taken, PB_E_DROPPED when it was malformed, unexpected or not for this board
 * (logged; the core's state is unchanged). The topic string need not outlive begin. */
void pb_message_begin(pb_core *core, const char *topic, size_t total_len);
void pb_message_data(pb_core *core, const uint8_t *data, size_t len);
int pb_message_end(pb_core *core);
/* begin + data + end for a message already in memory. */
int pb_message(pb_core *core, const char *topic, const uint8_t *payload, size_t len);

/* Drive time: heartbeats, artifact retries and backoff, daemon restarts, run timeouts, and
 * runs waiting for a module or a slot. Call it often (every 100 ms is plenty) with the
 * platform's monotonic clock. */
void pb_tick(pb_core *core, int64_t now_ms);
/* The monotonic time by which pb_tick should next be called (never later than the next
 * heartbeat). */
int64_t pb_next_deadline(const pb_core *core);

/* A run started with wasm_start ended. `status` is a pb_run_status; with PB_RUN_OK, `nresults`
 * (0 or 1) values are in `result`; `error` (may be NULL) says what went wrong otherwise. */
void pb_task_finished(pb_core *core, int slot, int status, int nresults, int64_t result,
                      const char *error);

/* Introspection, for tests and diagnostics. */
int pb_running(const pb_core *core);                 /* runs in progress */
int64_t pb_observed_generation(const pb_core *core); /* generation applied, 0 if none */
const char *pb_last_error(const pb_core *core);      /* why the last message was dropped */

#ifdef __cplusplus
}
#endif

#endif
