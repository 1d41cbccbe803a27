/* libFuzzer target: the message reader and the state machine behind it.
 *
 * The input is a little program of operations: desired sets and offers fed in slices (some
 * cut short), raw chunks, messages on arbitrary topics, ticks, ends of runs, reconnects, and
 * an honest server for one small module, so fuzzed sets also reach running tasks. Sanitizers
 * turn any memory or undefined-behaviour error into a crash. */
#include <stdio.h>
#include <string.h>

#include "fake.h"

static const uint8_t module[] = {0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00};
static const char *module_hex = "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476";

struct input {
    const uint8_t *p;
    size_t n;
};

static unsigned byte(struct input *in)
{
    if (in->n == 0)
        return 0;
    in->n--;
    return *in->p++;
}

static size_t take(struct input *in, size_t want, const uint8_t **out)
{
    if (want > in->n)
        want = in->n;
    *out = in->p;
    in->p += want;
    in->n -= want;
    return want;
}

/* Deliver `len` bytes on `topic` in slices of `slice`; announce one more byte when `cut`. */
static void deliver(const char *topic, const uint8_t *data, size_t len, size_t slice, bool cut)
{
    pb_message_begin(fake.core, topic, len + (cut ? 1 : 0));
    for (size_t at = 0; at < len; at += slice)
        pb_message_data(fake.core, data + at, len - at < slice ? len - at : slice);
    pb_message_end(fake.core);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    char topic[PB_TOPIC_MAX + 64];
    const uint8_t *payload;
    fake_reset(true);
    fake.quiet = true;
    if (fake_core() == NULL)
        return 0;
    fake_connect();
    while (in.n > 0) {
        switch (byte(&in) % 8) {
        case 0: {
            size_t len = byte(&in) | byte(&in) << 8;
            unsigned s = byte(&in);
            len = take(&in, len, &payload);
            deliver("m/default/c/default/proplets/board-7/desired", payload, len, (s & 127) + 1,
                    (s & 128) != 0);
            break;
        }
        case 1: {
            size_t len = byte(&in) | byte(&in) << 8;
            len = take(&in, len, &payload);
            snprintf(topic, sizeof topic,
                     "m/default/c/default/proplets/board-7/artifacts/%s/offer", module_hex);
            deliver(topic, payload, len, 7, false);
            break;
        }
        case 2: {
            unsigned index = byte(&in);
            size_t len = byte(&in) | byte(&in) << 8;
            len = take(&in, len, &payload);
            snprintf(topic, sizeof topic, "m/default/c/default/proplets/board-7/artifacts/%s/%u",
                     module_hex, index);
            deliver(topic, payload, len, 3, false);
            break;
        }
        case 3:
            fake.now += (int64_t)byte(&in) * 50;
            pb_tick(fake.core, fake.now);
            break;
        case 4: {
            int slot = (int)(byte(&in) % (PB_MAX_TASKS + 1));
            int status = (int)(byte(&in) % 3);
            pb_task_finished(fake.core, slot, status, 1, -(int64_t)slot, "trap: unreachable");
            break;
        }
        case 5:
            pb_on_disconnect(fake.core);
            fake_connect();
            break;
        case 6: {
            size_t tlen = take(&in, byte(&in), &payload);
            memcpy(topic, payload, tlen);
            topic[tlen] = 0;
            size_t len = byte(&in) | byte(&in) << 8;
            len = take(&in, len, &payload);
            deliver(topic, payload, len, 5, false);
            break;
        }
        default:
            fake_serve(module_hex, module, sizeof module);
            break;
        }
    }
    return 0;
}
