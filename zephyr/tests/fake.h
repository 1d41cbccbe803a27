/* A recording platform for the core's tests and fuzz target: every publish, subscribe, start
 * and stop is kept for inspection; the clocks and kv live in memory. */
#ifndef PB_FAKE_H
#define PB_FAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#ifndef FAKE_MSGS
#define FAKE_MSGS 512
#endif
#define FAKE_PAYLOAD 4096
#define FAKE_KV 32

struct fake_msg {
    char topic[PB_TOPIC_MAX];
    char payload[FAKE_PAYLOAD + 1]; /* NUL-terminated copy */
    size_t len;
    int qos;
    bool retain;
};

struct fake_start {
    int slot;
    const uint8_t *module;
    size_t len;
    char function[PB_FUNCTION_LEN + 1];
    int argc;
    int64_t args[PB_ARGS_MAX];
    struct pb_limits limits;
};

struct fake {
    struct pb_platform platform;
    pb_core *core;
    int64_t now, wall; /* wall < 0: unknown */
    struct fake_msg msgs[FAKE_MSGS];
    int nmsgs;
    char subs[8][PB_TOPIC_MAX];
    int nsubs;
    struct fake_start starts[64];
    int nstarts;
    int stops[64];
    int nstops;
    int start_rc;          /* what wasm_start returns */
    bool finish_at_once;   /* wasm_start reports the end of the run itself (a synchronous runtime) */
    bool stop_at_once;     /* wasm_stop reports the end of the run itself */
    bool quiet;            /* do not print log lines */
    char kv_keys[FAKE_KV][24];
    uint8_t kv_values[FAKE_KV][512];
    int kv_lens[FAKE_KV];
    char last_log[256];
    int warnings;
};

extern struct fake fake;
extern const char *fake_digest_hex;

/* Reset everything but kv (kv_clear too when clear_kv). */
void fake_reset(bool clear_kv);
/* A core "board-7" in default/default, labels zone=a, mcu=nrf5340, heartbeat 2500 ms. */
pb_core *fake_core(void);
pb_core *fake_core_with(const struct pb_identity *identity);
void fake_connect(void);
/* Deliver a message on root + suffix. */
int fake_deliver(const char *suffix, const void *payload, size_t len);
int fake_deliver_str(const char *suffix, const char *payload);
/* The last message whose topic ends with suffix, or NULL; how many there are. */
const struct fake_msg *fake_last(const char *suffix);
int fake_count(const char *suffix);
void fake_clear_msgs(void);
/* The last reported state's payload (or "" when none). */
const char *fake_state(void);

/* Content addressing and serving a module as an artifact server would. */
void fake_digest(const uint8_t *data, size_t len, char hex[65]);
/* Answer the last request for `hex` with an offer and the chunks it asks for. */
void fake_serve(const char *hex, const uint8_t *data, size_t len);
int fake_offer(const char *hex, size_t size, uint32_t chunk_size);
int fake_chunk(const char *hex, uint32_t index, const uint8_t *data, size_t len);

/* Load a fixture file into buf (NUL-terminated); returns its length or -1. */
long fake_fixture(const char *name, char *buf, size_t cap);

/* A desired set with one function task: {"generation":G,"tasks":[{...}]} */
int fake_desired_one(char *buf, size_t cap, int64_t generation, const char *name,
                     const char *spec_hash, const char *hex, size_t size, const char *extra);

#endif
