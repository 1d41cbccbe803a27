/* Internal layout of the board core: the arena's structs and the functions the core's source
 * files share. Not part of the API; tests include it to reach encoders and the scanner. */
#ifndef PROPELLER_INTERNAL_H
#define PROPELLER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "propeller/core.h"

#define PB_VERSION_DEFAULT "0.1.0"
#define PB_MAX_MESSAGE (256u * 1024u) /* a JSON message larger than this is dropped unread */
#define PB_MAX_INT 9007199254740991LL /* 2^53 - 1 */
#define PB_BITMAP_BYTES ((PB_MODULE_MAX / PB_MIN_CHUNK + 7) / 8 + 1)

/* ---- sha256 ---- */
struct pb_sha256 {
    uint32_t h[8];
    uint64_t bytes;
    uint8_t block[64];
    uint32_t used;
};
void pb_sha256_init(struct pb_sha256 *s);
void pb_sha256_update(struct pb_sha256 *s, const uint8_t *data, size_t len);
void pb_sha256_final(struct pb_sha256 *s, uint8_t out[32]);
void pb_sha256(const uint8_t *data, size_t len, uint8_t out[32]);

/* ---- streaming JSON scanner ---- */
enum pb_json_event {
    PB_JEV_OBJ_BEGIN,
    PB_JEV_OBJ_END,
    PB_JEV_ARR_BEGIN,
    PB_JEV_ARR_END,
    PB_JEV_KEY,       /* key text in key[] (key_over: longer than kept) */
    PB_JEV_STR_BEGIN, /* a string value starts: the handler may set sink/sink_cap */
    PB_JEV_STR_END,   /* sink_len bytes were written, sink_over when more did not fit */
    PB_JEV_NUM,       /* num_kind and num */
    PB_JEV_TRUE,
    PB_JEV_FALSE,
    PB_JEV_NULL,
};
enum pb_num_kind { PB_NUM_INT, PB_NUM_FLOAT, PB_NUM_HUGE };

struct pb_json;
/* Returns 0 to go on, or a negative value to stop: the input is then malformed (the handler
 * sets json->error). */
typedef int (*pb_json_handler)(struct pb_json *json, int event);

struct pb_json {
    pb_json_handler handler;
    void *user;
    const char *error; /* why the input was refused */
    uint32_t stack;    /* one bit per open container: 1 object, 0 array */
    uint8_t depth;     /* open containers; for *_BEGIN events before the push, for *_END after the pop */
    uint8_t state;
    uint8_t sub;   /* literal position, escape digits... */
    uint8_t utf8;  /* continuation bytes still expected */
    uint8_t utf8_lo, utf8_hi; /* allowed range of the next continuation byte */
    bool in_key;
    bool key_over;
    bool sink_over;
    uint32_t code;  /* \u escape being read */
    uint32_t high;  /* pending high surrogate */
    char *sink;
    size_t sink_cap; /* bytes the sink holds, NUL excluded (the scanner terminates it) */
    size_t sink_len;
    char key[PB_JSON_KEY_LEN + 1];
    uint8_t key_len;
    char num_text[40];
    uint8_t num_len;
    uint8_t num_kind;
    int64_t num;
};
void pb_json_begin(struct pb_json *json, pb_json_handler handler, void *user);
/* Feed bytes; returns false once the input is malformed (further feeding is ignored). */
bool pb_json_feed(struct pb_json *json, const uint8_t *data, size_t len);
/* The input ended: true when it held exactly one complete value. */
bool pb_json_end(struct pb_json *json);

/* ---- output ---- */
struct pb_out {
    char *buf;
    size_t cap;
    size_t len;
    bool over;
};
void pb_out_init(struct pb_out *out, char *buf, size_t cap);
void pb_out_raw(struct pb_out *out, const char *text);
void pb_out_char(struct pb_out *out, char c);
void pb_out_str(struct pb_out *out, const char *text);  /* a JSON string, quoted and escaped */
void pb_out_i64(struct pb_out *out, int64_t value);
void pb_out_secs(struct pb_out *out, int64_t ms);      /* ms as Python's float repr of seconds */
void pb_out_hex(struct pb_out *out, const uint8_t *bytes, size_t len);
/* NUL-terminate; returns the length, or -1 when it did not fit. */
int pb_out_end(struct pb_out *out);

/* Bounded copies that never cut a UTF-8 sequence; they return dst. */
char *pb_copy(char *dst, size_t cap, const char *src);
char *pb_append(char *dst, size_t cap, const char *src);
char *pb_append_i64(char *dst, size_t cap, int64_t value);
/* Parse a decimal int64 (optional '-', digits only); false when not an integer or out of range. */
bool pb_parse_i64(const char *text, int64_t *value);
/* Drop an incomplete UTF-8 sequence at the end of s (left by a cut). */
void pb_utf8_trim(char *s);
bool pb_hex_decode(const char *hex, size_t len, uint8_t *out);

/* ---- messages (encoders produce the bytes pydantic produces) ---- */
enum pb_task_state { PB_PENDING, PB_RUNNING, PB_COMPLETED, PB_FAILED, PB_STOPPED };
extern const char *const pb_state_names[5];

struct pb_ident {
    char id[PB_ID_LEN + 1];
    char domain[PB_ID_LEN + 1];
    char channel[PB_ID_LEN + 1];
    char version[PB_VERSION_LEN + 1];
    char label_keys[PB_LABELS_MAX][PB_LABEL_KEY_LEN + 1];
    char label_values[PB_LABELS_MAX][PB_LABEL_VALUE_LEN + 1];
    uint8_t label_count;
    uint32_t heartbeat_ms;
};

/* One task as the reported state shows it. Timestamps < 0 are unknown (left out). */
struct pb_status_view {
    const char *name, *spec_hash, *owner;
    int state;
    uint32_t restarts, runs;
    int64_t started_ms, finished_ms;
    const char *result; /* NULL: none */
    const char *reason; /* NULL: none */
};
struct pb_result_view {
    const char *task, *spec_hash;
    int state;
    uint32_t runs;
    int64_t started_ms, finished_ms;
    int nresults; /* -1: no result list; 0 or 1 values */
    int64_t result;
    const char *error; /* NULL: none */
};

/* Topic under the board's own root, or the shared request topic. suffix NULL: the root. */
int pb_topic(const struct pb_ident *id, char *buf, size_t cap, const char *suffix,
             const char *suffix2);
int pb_topic_request(const struct pb_ident *id, char *buf, size_t cap);
int pb_encode_announce(const struct pb_ident *id, char *buf, size_t cap);
int pb_encode_presence(const struct pb_ident *id, bool online, char *buf, size_t cap);
int pb_encode_heartbeat(const struct pb_ident *id, uint64_t seq, int64_t ts_ms, int running,
                        int64_t generation, char *buf, size_t cap);
/* `terse` leaves out results and reasons (for a state that would not fit otherwise). */
int pb_encode_state(const struct pb_ident *id, int64_t generation, int64_t ts_ms,
                    const struct pb_status_view *tasks, int count, bool terse, char *buf,
                    size_t cap);
int pb_encode_result(const struct pb_ident *id, const struct pb_result_view *r, char *buf,
                     size_t cap);
int pb_encode_request(const struct pb_ident *id, const uint8_t digest[32], uint32_t chunk_size,
                      const uint32_t *chunks, int nchunks, const char *image, char *buf,
                      size_t cap);

/* ---- the core's state ---- */
enum pb_bad {
    PB_BAD_NONE,
    PB_BAD_NO_FUNCTION,
    PB_BAD_STDIN,
    PB_BAD_ENV,
    PB_BAD_FIELD,    /* bad_key names a field the board cannot honour */
    PB_BAD_TOO_LONG, /* bad_key names a field longer than the board keeps */
    PB_BAD_ARG,      /* argument bad_index is not an integer */
    PB_BAD_ARGS,     /* more arguments than PB_ARGS_MAX */
    PB_BAD_SIZE,     /* module larger than PB_MODULE_MAX */
};

struct pb_spec {
    char name[PB_NAME_LEN + 1];
    char spec_hash[PB_SPEC_HASH_LEN + 1];
    char owner[PB_OWNER_LEN + 1];
    char function[PB_FUNCTION_LEN + 1];
    char image[PB_IMAGE_LEN + 1];
    char bad_key[PB_JSON_KEY_LEN + 1];
    uint8_t digest[32];
    int64_t args[PB_ARGS_MAX];
    uint64_t size;
    struct pb_limits limits;
    uint8_t argc;
    uint8_t daemon;
    uint8_t bad;
    uint8_t bad_index;
    uint8_t seen; /* required fields seen, and function present */
};

struct pb_task {
    struct pb_spec spec;
    bool used;
    bool finished;        /* this spec runs no more: one-shot done, or failed for good */
    bool restart_pending; /* a daemon waits for restart_at */
    bool module_error;    /* reason holds an artifact server's error: requests keep it */
    uint8_t state;
    int8_t run; /* run slot, -1 when not running */
    uint8_t failures_in_row;
    uint32_t runs, restarts;
    int64_t started_ms, finished_ms; /* wall clock; -1 unknown */
    int64_t restart_at;
    bool has_result;
    char result[PB_RESULT_LEN + 1];
    char reason[PB_REASON_LEN + 1];
    /* The last run's task result, kept to publish it again after a reconnect (the broker
     * may have lost its retained copy, or the run ended while the session was down). */
    bool has_last;
    uint8_t last_state;
    int8_t last_nresults;
    uint32_t last_runs;
    int64_t last_value;
    int64_t last_started_ms, last_finished_ms;
    char last_error[PB_ERROR_LEN + 1];
};

enum pb_stop { PB_STOP_NONE, PB_STOP_TIMEOUT, PB_STOP_ORPHAN };

struct pb_run {
    bool busy;
    uint8_t stop;  /* enum pb_stop */
    int8_t task;   /* -1: the task left or changed while this run went on */
    int8_t module;
    uint32_t seq;
    int64_t started_mono;
    int64_t deadline; /* 0: none */
};

enum pb_module_state { PB_MOD_FREE, PB_MOD_WANT, PB_MOD_FILL, PB_MOD_READY };

struct pb_module {
    uint8_t state;
    uint8_t attempts;   /* requests since the last progress, for backoff */
    uint8_t mismatches; /* complete transfers refused by the digest check */
    uint8_t digest[32];
    bool windowed;        /* the last request listed indices: ask for the next window when in */
    uint16_t outstanding; /* listed indices not received yet */
    uint32_t size, chunk_size, count, received;
    int64_t next_try, progress;
    uint8_t have[PB_BITMAP_BYTES];
    uint8_t asked[PB_BITMAP_BYTES];
};

struct pb_unplaced {
    char name[PB_NAME_LEN + 1];
    char spec_hash[PB_SPEC_HASH_LEN + 1];
    char owner[PB_OWNER_LEN + 1];
};

enum pb_mode { PB_MODE_IGNORE, PB_MODE_BAD, PB_MODE_DESIRED, PB_MODE_OFFER, PB_MODE_CHUNK };

/* A desired set or an offer being read. Nothing here touches the live state before the
 * message has been read completely and validated. */
struct pb_inbox {
    uint8_t mode;
    bool quiet; /* a drop not worth a warning (a late chunk) */
    uint8_t top_key, task_key;
    bool in_task;
    bool bad_generation;
    size_t total, got;
    struct pb_json json;
    /* desired set */
    int64_t generation;
    struct pb_spec cur;
    char arg_text[PB_ARG_LEN + 1];
    char field[PB_JSON_KEY_LEN + 1]; /* the unknown task field being read */
    int arg_index;
    struct pb_spec staged[PB_MAX_TASKS];
    int staged_count;
    struct pb_unplaced unplaced[PB_UNPLACED_MAX];
    int unplaced_count;
    int lost; /* tasks neither placed nor kept for the report */
    /* offer */
    uint8_t digest[32];
    char digest_text[72];
    int64_t size, chunk_size, chunks;
    char error[PB_REASON_LEN + 1];
    bool has_error;
    uint8_t offer_seen;
    /* chunk */
    int8_t module;
    uint32_t index, offset;
};

/* What kv keeps per one-shot task, so a reboot neither reruns nor forgets it. */
#define PB_RECORD_MAGIC 0xB1
struct pb_record {
    uint8_t magic;
    uint8_t state; /* PB_RUNNING: a run was in progress */
    uint8_t has_result;
    uint8_t pad;
    uint32_t runs, restarts;
    int64_t started_ms, finished_ms;
    char spec_hash[PB_SPEC_HASH_LEN + 1];
    char result[PB_RESULT_LEN + 1];
    char reason[PB_REASON_LEN + 1];
};

struct pb_core {
    const struct pb_platform *platform;
    struct pb_ident ident;
    char root[PB_TOPIC_MAX]; /* m/{domain}/c/{channel}/proplets/{id}/ */
    size_t root_len;
    int64_t now;
    int64_t generation;
    int64_t next_heartbeat;
    uint64_t heartbeat_seq;
    uint32_t run_seq;
    bool connected;
    bool dirty; /* the reported state changed since it was last published */
    bool again; /* a run ended inside another call: schedule once more before returning */
    uint8_t depth; /* nesting of API calls (platform callbacks may call back in) */
    struct pb_task tasks[PB_MAX_TASKS];
    struct pb_run runs[PB_MAX_TASKS];
    struct pb_module modules[PB_MODULE_SLOTS];
    struct pb_unplaced unplaced[PB_UNPLACED_MAX];
    int unplaced_count;
    int unplaced_lost; /* further tasks not placed, beyond the list: counted in the reason */
    struct pb_inbox in;
    struct pb_record record;
    struct pb_status_view views[PB_MAX_TASKS + PB_UNPLACED_MAX];
    char last_error[96];
    char topic[PB_TOPIC_MAX];
    char out[PB_OUT_MAX];
    uint8_t module_data[PB_MODULE_SLOTS][PB_MODULE_MAX];
};

/* core.c */
void pb_log(pb_core *c, int level, const char *a, const char *b);
int64_t pb_wall(pb_core *c);
void pb_publish(pb_core *c, const char *topic, const char *payload, int len, int qos,
                bool retain);
void pb_schedule(pb_core *c);
void pb_commit(pb_core *c);
void pb_flush(pb_core *c);
void pb_task_fail(pb_core *c, struct pb_task *t, const char *reason);
bool pb_task_wants_module(const struct pb_task *t);

/* inbox.c */
void pb_inbox_begin(pb_core *c, const char *topic, size_t total);
void pb_inbox_data(pb_core *c, const uint8_t *data, size_t len);
int pb_inbox_end(pb_core *c);

/* artifact.c */
int pb_module_find(pb_core *c, const uint8_t digest[32]);
int pb_module_claim(pb_core *c, const uint8_t digest[32]);
void pb_module_request(pb_core *c, int m, bool resume);
void pb_module_offer(pb_core *c, int m);
bool pb_module_chunk_begin(pb_core *c, int m, uint32_t index, size_t len);
void pb_module_chunk_data(pb_core *c, const uint8_t *data, size_t len);
void pb_module_chunk_end(pb_core *c);
void pb_modules_tick(pb_core *c);
void pb_modules_resend(pb_core *c);
void pb_modules_drop_unwanted(pb_core *c);
int64_t pb_modules_deadline(const pb_core *c, int64_t deadline);
bool pb_module_pinned(const pb_core *c, int m);
bool pb_bit(const uint8_t *map, uint32_t i);

#endif
