/* The board core as a host shared library (libpropeller_board.so), with a flat C interface.
 *
 * Every argument is an int, an int64, a size, a char* or a plain pointer, so Python's ctypes
 * (or any FFI) calls it without declaring structs. The handle lives in memory the caller
 * provides (pbh_size() bytes, aligned to 8; a ctypes create_string_buffer is fine).
 *
 * Order: pbh_init, then the pbh_set_* callbacks (every one marked required), then
 * pbh_will / pbh_connect and the rest. Callbacks run inside the pbh_* call that triggers them,
 * on the caller's thread; calls into one handle must not overlap (see platform.h).
 */
#ifndef PROPELLER_BOARD_H
#define PROPELLER_BOARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Callback types. `ctx` is the pointer given with the setter. */
typedef int64_t (*pbh_clock_fn)(void *ctx);
typedef int (*pbh_publish_fn)(void *ctx, const char *topic, const uint8_t *payload, size_t len,
                              int qos, int retain);
typedef int (*pbh_subscribe_fn)(void *ctx, const char *filter, int qos);
/* memory, timeout_ms and fuel are 0 when the task sets no such limit. */
typedef int (*pbh_wasm_start_fn)(void *ctx, int slot, const uint8_t *module, size_t len,
                                 const char *function, int argc, const int64_t *args,
                                 int64_t memory, int64_t timeout_ms, int64_t fuel);
typedef void (*pbh_wasm_stop_fn)(void *ctx, int slot);
typedef int (*pbh_kv_get_fn)(void *ctx, const char *key, uint8_t *buf, size_t len);
typedef int (*pbh_kv_set_fn)(void *ctx, const char *key, const uint8_t *buf, size_t len);
typedef void (*pbh_log_fn)(void *ctx, int level, const char *msg);

/* Bytes of caller memory one handle needs. */
size_t pbh_size(void);

/* Set up a handle in `mem`. `labels` is "key=value,key=value" (NULL or "" for none);
 * domain/channel NULL mean "default"; heartbeat_ms 0 means 5000; version NULL means the
 * core's own. Returns 0, or a negative value on a bad argument. */
int pbh_init(void *mem, size_t len, const char *proplet_id, const char *domain,
             const char *channel, const char *labels, int heartbeat_ms, const char *version);

/* Callbacks. now (monotonic ms), publish, subscribe, wasm_start and wasm_stop are required;
 * wall (unix ms, negative while unknown), kv_get, kv_set and log are optional. */
void pbh_set_now(void *h, pbh_clock_fn fn, void *ctx);
void pbh_set_wall(void *h, pbh_clock_fn fn, void *ctx);
void pbh_set_publish(void *h, pbh_publish_fn fn, void *ctx);
void pbh_set_subscribe(void *h, pbh_subscribe_fn fn, void *ctx);
void pbh_set_wasm_start(void *h, pbh_wasm_start_fn fn, void *ctx);
void pbh_set_wasm_stop(void *h, pbh_wasm_stop_fn fn, void *ctx);
void pbh_set_kv_get(void *h, pbh_kv_get_fn fn, void *ctx);
void pbh_set_kv_set(void *h, pbh_kv_set_fn fn, void *ctx);
void pbh_set_log(void *h, pbh_log_fn fn, void *ctx);

/* The last will: writes NUL-terminated topic and payload; returns the payload length or < 0. */
int pbh_will(void *h, char *topic, size_t topic_cap, char *payload, size_t payload_cap);

/* Session events and incoming messages (see core.h for the meaning). */
void pbh_connect(void *h);
void pbh_disconnect(void *h);
void pbh_message_begin(void *h, const char *topic, size_t total_len);
void pbh_message_data(void *h, const uint8_t *data, size_t len);
int pbh_message_end(void *h); /* 0 taken, < 0 dropped */
int pbh_message(void *h, const char *topic, const uint8_t *payload, size_t len);

void pbh_tick(void *h, int64_t now_ms);
int64_t pbh_next_deadline(void *h);
/* status: 0 returned (nresults 0 or 1 in result), 1 trapped/failed (error), 2 stopped. */
void pbh_task_finished(void *h, int slot, int status, int nresults, int64_t result,
                       const char *error);

/* Introspection. */
int pbh_running(void *h);
int64_t pbh_observed_generation(void *h);
const char *pbh_last_error(void *h);

/* Build-time sizes of this library (config.h), e.g. to size an emulator's expectations. */
int pbh_max_tasks(void);
int pbh_module_max(void);
int pbh_chunk_size(void);

#ifdef __cplusplus
}
#endif

#endif
