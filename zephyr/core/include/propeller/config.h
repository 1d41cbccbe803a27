/* Every size and timing of the board core, in one place.
 *
 * Each value can be overridden with -D (or a Kconfig-generated header included before this
 * one). The core's RAM is one arena whose size follows from these values; pb_arena_size()
 * and PB_ARENA_BYTES (core.h) tell how much.
 */
#ifndef PROPELLER_CONFIG_H
#define PROPELLER_CONFIG_H

/* Tasks the board holds (desired tasks in the table) and runs at once. Announced as max_tasks. */
#ifndef PB_MAX_TASKS
#define PB_MAX_TASKS 4
#endif

/* Module buffers: each holds one verified module (or one being fetched). Tasks sharing a
 * digest share a buffer. A buffer in use by a running task is never written. */
#ifndef PB_MODULE_SLOTS
#define PB_MODULE_SLOTS 2
#endif

/* Bytes of one module buffer: the largest module the board accepts. */
#ifndef PB_MODULE_MAX
#define PB_MODULE_MAX (64u * 1024u)
#endif

/* Chunk size the board asks for. The protocol's minimum is 64 bytes. */
#ifndef PB_CHUNK_SIZE
#define PB_CHUNK_SIZE 1024u
#endif

/* Smallest chunk size an offer may use; bounds the received-chunk bitmap. */
#ifndef PB_MIN_CHUNK
#define PB_MIN_CHUNK 64u
#endif

/* Chunk indices asked for in one request (the next window goes out once this one is in). */
#ifndef PB_REQUEST_WINDOW
#define PB_REQUEST_WINDOW 32
#endif

/* Longest topic, NUL included. Fits the longest protocol topic with 63-character segments. */
#ifndef PB_TOPIC_MAX
#define PB_TOPIC_MAX 288
#endif

/* Encode buffer for one outgoing message. A reported state that does not fit is sent
 * without per-task reasons and results rather than not at all. */
#ifndef PB_OUT_MAX
#define PB_OUT_MAX 2048
#endif

/* Integer arguments of one call, and the longest argument text (digits and sign). */
#ifndef PB_ARGS_MAX
#define PB_ARGS_MAX 8
#endif
#ifndef PB_ARG_LEN
#define PB_ARG_LEN 24
#endif

/* Longest exported function name the board keeps (the protocol allows 128). */
#ifndef PB_FUNCTION_LEN
#define PB_FUNCTION_LEN 64
#endif

/* Longest OCI image reference the board keeps to pass on in artifact requests. */
#ifndef PB_IMAGE_LEN
#define PB_IMAGE_LEN 128
#endif

/* Short result summary per task in the reported state (the protocol allows 256). */
#ifndef PB_RESULT_LEN
#define PB_RESULT_LEN 64
#endif

/* Why a task failed or waits, in the reported state (the protocol allows 512). */
#ifndef PB_REASON_LEN
#define PB_REASON_LEN 160
#endif

/* Error text of the last run, as sent in the task result. */
#ifndef PB_ERROR_LEN
#define PB_ERROR_LEN 128
#endif

/* Labels of the board: count and lengths. */
#ifndef PB_LABELS_MAX
#define PB_LABELS_MAX 4
#endif
#ifndef PB_LABEL_KEY_LEN
#define PB_LABEL_KEY_LEN 32
#endif
#ifndef PB_LABEL_VALUE_LEN
#define PB_LABEL_VALUE_LEN 64
#endif

/* Version string announced. */
#ifndef PB_VERSION_LEN
#define PB_VERSION_LEN 32
#endif

/* Tasks beyond PB_MAX_TASKS whose names are kept to report them "not placed". */
#ifndef PB_UNPLACED_MAX
#define PB_UNPLACED_MAX 4
#endif

/* JSON nesting the scanner follows (deeper input is dropped), and the longest key it keeps. */
#ifndef PB_JSON_DEPTH
#define PB_JSON_DEPTH 16
#endif
#ifndef PB_JSON_KEY_LEN
#define PB_JSON_KEY_LEN 24
#endif

/* Artifact transfer timing: no chunk for PB_STALL_MS means ask again for the missing ones;
 * attempts back off from PB_BACKOFF_INITIAL_MS doubling up to PB_BACKOFF_MAX_MS. */
#ifndef PB_STALL_MS
#define PB_STALL_MS 1000
#endif
#ifndef PB_BACKOFF_INITIAL_MS
#define PB_BACKOFF_INITIAL_MS 500
#endif
#ifndef PB_BACKOFF_MAX_MS
#define PB_BACKOFF_MAX_MS 5000
#endif

/* Complete transfers whose content does not match the digest before the task fails. */
#ifndef PB_DIGEST_ATTEMPTS
#define PB_DIGEST_ATTEMPTS 3
#endif

/* Daemon restarts back off from the initial delay doubling up to the maximum; a daemon that
 * ran at least PB_DAEMON_HEALTHY_MS restarts after the initial delay again. */
#ifndef PB_DAEMON_BACKOFF_INITIAL_MS
#define PB_DAEMON_BACKOFF_INITIAL_MS 1000
#endif
#ifndef PB_DAEMON_BACKOFF_MAX_MS
#define PB_DAEMON_BACKOFF_MAX_MS 30000
#endif
#ifndef PB_DAEMON_HEALTHY_MS
#define PB_DAEMON_HEALTHY_MS 10000
#endif

/* Sizes fixed by the protocol (schemas/messages.py); not meant to be changed. */
#define PB_ID_LEN 63        /* proplet id, domain, channel */
#define PB_NAME_LEN 63      /* task name (DNS label) */
#define PB_SPEC_HASH_LEN 80
#define PB_OWNER_LEN 63

#if PB_MAX_TASKS < 1 || PB_MAX_TASKS > 64
#error "PB_MAX_TASKS must be 1..64"
#endif
#if PB_MODULE_SLOTS < 1
#error "PB_MODULE_SLOTS must be at least 1"
#endif
#if PB_CHUNK_SIZE < 64 || PB_MIN_CHUNK < 64
#error "chunk sizes below the protocol minimum of 64 bytes"
#endif
#if PB_REQUEST_WINDOW < 1 || PB_REQUEST_WINDOW > 512
#error "PB_REQUEST_WINDOW must be 1..512 (the protocol's window; it also sizes a stack array)"
#endif
#if PB_UNPLACED_MAX < 1
#error "PB_UNPLACED_MAX must be at least 1"
#endif
/* Texts the board sends must stay within the protocol's limits. */
#if PB_RESULT_LEN > 256 || PB_REASON_LEN > 512 || PB_ERROR_LEN > 4096 || PB_VERSION_LEN > 64
#error "a text length exceeds the protocol's limit"
#endif
#if PB_FUNCTION_LEN > 128 || PB_IMAGE_LEN > 512
#error "a desired-task field is longer than the protocol allows"
#endif
#if PB_ARG_LEN < 21
#error "PB_ARG_LEN must hold an int64 in decimal (21 characters)"
#endif

#endif
