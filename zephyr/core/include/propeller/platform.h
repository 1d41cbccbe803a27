/* The platform interface: everything the board core needs from the world.
 *
 * The core has no OS, network, storage or Wasm runtime of its own. A platform (the Zephyr
 * application, the host library, a test double) fills a struct pb_platform with function
 * pointers and a context pointer, and passes it to pb_init. The struct must stay valid (and
 * unchanged while a core call runs) for the core's lifetime: the core keeps the pointer.
 *
 * Threading: the core is not thread-safe. The platform serialises every call into the core
 * (pb_on_connect, pb_message_*, pb_tick, pb_task_finished...), e.g. by making them all from
 * one thread or under one mutex. Callbacks below are invoked from inside those calls.
 */
#ifndef PROPELLER_PLATFORM_H
#define PROPELLER_PLATFORM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum pb_log_level {
    PB_LOG_ERROR = 0,
    PB_LOG_WARN = 1,
    PB_LOG_INFO = 2,
    PB_LOG_DEBUG = 3,
};

/* Limits of one run, from the desired task. 0 means no limit was given. The core enforces
 * timeout_ms itself (pb_tick stops the run); it is passed on so a runtime can also use it. */
struct pb_limits {
    uint64_t memory;    /* bytes of linear memory */
    int64_t timeout_ms; /* wall clock per run */
    int64_t fuel;       /* instruction budget; a runtime that cannot meter fails the start */
};

struct pb_platform {
    void *ctx; /* passed back as the first argument of every callback */

    /* Monotonic milliseconds (any origin). Required. */
    int64_t (*now_ms)(void *ctx);
    /* Unix time in milliseconds, or a negative value while unknown (no SNTP yet). May be NULL. */
    int64_t (*wall_ms)(void *ctx);

    /* Publish one message; the payload is not NUL-terminated. Returns 0 on success, negative
     * on failure (e.g. not connected); the core carries on either way. Required. */
    int (*publish)(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos,
                   bool retain);
    /* Subscribe to a topic filter. Returns 0 on success. Required. */
    int (*subscribe)(void *ctx, const char *filter, int qos);

    /* Start one run in a platform slot (0 .. PB_MAX_TASKS-1) and return at once: the run
     * goes on elsewhere and its end is reported with pb_task_finished(slot, ...), exactly
     * once per successful start, also after wasm_stop. pb_task_finished may also be called
     * from inside wasm_start (a runtime that runs synchronously). `module` stays valid and
     * unchanged until the run ends. `function` is NUL-terminated; args[0..argc-1] are the
     * call's integer arguments. Returns 0 when started; any other value means nothing runs
     * (and no pb_task_finished follows): the task fails with that code. Required. */
    int (*wasm_start)(void *ctx, int slot, const uint8_t *module, size_t len,
                      const char *function, int argc, const int64_t *args,
                      const struct pb_limits *limits);
    /* Ask the run in `slot` to stop (timeout, task removed or replaced). The platform still
     * reports its end with pb_task_finished. Required. */
    void (*wasm_stop)(void *ctx, int slot);

    /* Persistent key-value state (Zephyr settings, NVS...). Keys are at most 23 characters.
     * kv_get copies at most len bytes into buf and returns the value's length, or a negative
     * value when the key is absent. kv_set stores the value (len 0 deletes the key) and
     * returns 0 on success. Both may be NULL: then one-shot tasks run again after a reboot. */
    int (*kv_get)(void *ctx, const char *key, void *buf, size_t len);
    int (*kv_set)(void *ctx, const char *key, const void *buf, size_t len);

    /* One log line, NUL-terminated, without a newline. May be NULL. */
    void (*log)(void *ctx, int level, const char *msg);

    /* Optional seam for hardware crypto: sha256 of data[0..len) into out. Returns 0 on success.
     * NULL selects the core's software implementation (FIPS 180-4). */
    int (*sha256)(void *ctx, const uint8_t *data, size_t len, uint8_t out[32]);
};

#ifdef __cplusplus
}
#endif

#endif
