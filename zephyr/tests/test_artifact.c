/* Artifact reassembly: refused chunks, any order, duplicates, slices, digest mismatch and
 * retry, modules larger than the buffer, running modules untouched, resume after a broker
 * drop, request windows, stall backoff, offer errors and the sha256 seam. */
#include <stdio.h>
#include <stdlib.h>

#include "fake.h"
#include "harness.h"

static uint8_t mod_a[40000], mod_b[3000], wrong[3000];
static char hex_a[65], hex_b[65];
static char doc[4096];

static void setup(void)
{
    fake_reset(true);
    for (size_t i = 0; i < sizeof mod_a; i++)
        mod_a[i] = (uint8_t)(i * 31 + (i >> 8));
    for (size_t i = 0; i < sizeof mod_b; i++)
        mod_b[i] = (uint8_t)(i * 13 + 1);
    memcpy(wrong, mod_b, sizeof wrong);
    wrong[1500] ^= 1;
    fake_digest(mod_a, sizeof mod_a, hex_a);
    fake_digest(mod_b, sizeof mod_b, hex_b);
    fake_core();
    fake_connect();
}

static void want(int64_t generation, const char *name, const char *hex, size_t size,
                 const char *extra)
{
    fake_desired_one(doc, sizeof doc, generation, name, "h1", hex, size, extra);
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
}

static const char *last_request(void)
{
    const struct fake_msg *m = fake_last("/artifacts/request");
    return m != NULL ? m->payload : "(none)";
}

static void truncated_chunk_refused(void)
{
    setup();
    want(1, "t", hex_b, sizeof mod_b, "\"function\":\"f\"");
    CHECK_CONTAINS(last_request(), "\"chunk_size\":1024}");
    CHECK_INT(fake_offer(hex_b, sizeof mod_b, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_b, 0, mod_b, 1023), PB_E_DROPPED);
    CHECK_CONTAINS(pb_last_error(fake.core), "length does not fit its index");
    CHECK_INT(fake_chunk(hex_b, 2, mod_b + 2048, 1024), PB_E_DROPPED);
    CHECK_INT(fake_chunk(hex_b, 3, mod_b, 10), PB_E_DROPPED);
    char suffix[128];
    snprintf(suffix, sizeof suffix, "artifacts/%s/1x", hex_b);
    CHECK_INT(fake_deliver(suffix, mod_b, 1024), PB_E_DROPPED);
    /* A chunk whose stream ends early is refused too, and does not count. */
    snprintf(suffix, sizeof suffix, "m/default/c/default/proplets/board-7/artifacts/%s/0", hex_b);
    pb_message_begin(fake.core, suffix, 1024);
    pb_message_data(fake.core, mod_b, 1000);
    CHECK_INT(pb_message_end(fake.core), PB_E_DROPPED);
    CHECK_INT(fake.nstarts, 0);
    CHECK_INT(fake_chunk(hex_b, 0, mod_b, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_b, 1, mod_b + 1024, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_b, 2, mod_b + 2048, 952), PB_OK);
    CHECK_INT(fake.nstarts, 1);
    CHECK(fake.starts[0].len == sizeof mod_b && memcmp(fake.starts[0].module, mod_b, sizeof mod_b) == 0);
    /* Late duplicates after completion are dropped; the module stays as verified. */
    CHECK_INT(fake_chunk(hex_b, 0, wrong, 1024), PB_E_DROPPED);
    CHECK(memcmp(fake.starts[0].module, mod_b, sizeof mod_b) == 0);
}

static void reordered_duplicated_sliced(void)
{
    setup();
    want(1, "t", hex_b, sizeof mod_b, "\"function\":\"f\"");
    CHECK_INT(fake_offer(hex_b, sizeof mod_b, 1024), PB_OK);
    static const uint32_t order[] = {2, 0, 2, 0};
    char topic[PB_TOPIC_MAX];
    for (size_t k = 0; k < 4; k++) {
        uint32_t i = order[k];
        size_t len = i == 2 ? 952 : 1024;
        /* The second copy carries different bytes: the first one is kept. */
        const uint8_t *src = (k < 2 ? mod_b : wrong) + i * 1024;
        snprintf(topic, sizeof topic, "m/default/c/default/proplets/board-7/artifacts/%s/%u", hex_b, i);
        pb_message_begin(fake.core, topic, len);
        for (size_t at = 0, step = k + 1; at < len; at += step, step = step * 3 % 17 + 1)
            pb_message_data(fake.core, src + at, len - at < step ? len - at : step);
        CHECK_INT(pb_message_end(fake.core), PB_OK);
    }
    CHECK_INT(fake.nstarts, 0);
    CHECK_INT(fake_chunk(hex_b, 1, mod_b + 1024, 1024), PB_OK);
    CHECK_INT(fake.nstarts, 1);
    CHECK(memcmp(fake.starts[0].module, mod_b, sizeof mod_b) == 0);
}

static void digest_mismatch_then_success(void)
{
    setup();
    want(1, "t", hex_b, sizeof mod_b, "\"function\":\"f\"");
    int requests = fake_count("/artifacts/request");
    fake_serve(hex_b, wrong, sizeof wrong);
    CHECK_INT(fake.nstarts, 0);
    CHECK_CONTAINS(fake.last_log, "does not match its digest");
    /* Thrown away: the next request asks for everything again, after a backoff. */
    pb_tick(fake.core, fake.now + 100);
    CHECK_INT(fake_count("/artifacts/request"), requests);
    fake.now += PB_BACKOFF_INITIAL_MS;
    pb_tick(fake.core, fake.now);
    CHECK_INT(fake_count("/artifacts/request"), requests + 1);
    CHECK(strstr(last_request(), "\"chunks\"") == NULL);
    fake_serve(hex_b, mod_b, sizeof mod_b);
    CHECK_INT(fake.nstarts, 1);
    CHECK(memcmp(fake.starts[0].module, mod_b, sizeof mod_b) == 0);

    /* Bounded: after PB_DIGEST_ATTEMPTS bad transfers the task fails. */
    setup();
    want(1, "t", hex_b, sizeof mod_b, "\"function\":\"f\"");
    for (int i = 0; i < PB_DIGEST_ATTEMPTS; i++) {
        fake_serve(hex_b, wrong, sizeof wrong);
        fake.now += PB_BACKOFF_MAX_MS;
        pb_tick(fake.core, fake.now);
    }
    CHECK_INT(fake.nstarts, 0);
    CHECK_CONTAINS(fake_state(), "\"state\":\"Failed\",\"restarts\":0,\"runs\":0,\"reason\":\"digest "
                                 "mismatch: the content received for sha256:");
    int requests_after = fake_count("/artifacts/request");
    fake.now += 60000;
    pb_tick(fake.core, fake.now);
    CHECK_INT(fake_count("/artifacts/request"), requests_after);
}

static void module_larger_than_buffer(void)
{
    setup();
    want(1, "big", hex_a, PB_MODULE_MAX + 1, "\"function\":\"f\"");
    CHECK_INT(fake_count("/artifacts/request"), 0);
    CHECK_CONTAINS(fake_state(), "\"reason\":\"module of 65537 bytes is larger than this board's "
                                 "module buffer of 65536 bytes\"");
    /* The desired size said small, the offer says otherwise: refused before any byte lands. */
    setup();
    want(1, "big", hex_a, 100, "\"function\":\"f\"");
    CHECK_INT(fake_offer(hex_a, 70000, 1024), PB_OK);
    CHECK_CONTAINS(fake_state(), "\"state\":\"Failed\",\"restarts\":0,\"runs\":0,\"reason\":\"module "
                                 "of 70000 bytes is larger than this board's module buffer of "
                                 "65536 bytes\"");
    CHECK_INT(fake_chunk(hex_a, 0, mod_a, 1024), PB_E_DROPPED);
}

static void running_module_untouched(void)
{
    setup();
    struct {
        const char *name, *hex;
        size_t size;
    } t[3] = {{"a", hex_a, sizeof mod_a}, {"b", hex_b, sizeof mod_b}, {"c", NULL, 3000}};
    char hex_c[65];
    fake_digest(wrong, sizeof wrong, hex_c);
    t[2].hex = hex_c;
    int len = snprintf(doc, sizeof doc, "{\"generation\":1,\"tasks\":[");
    for (int i = 0; i < 3; i++)
        len += snprintf(doc + len, sizeof doc - (size_t)len,
                        "%s{\"name\":\"%s\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":"
                        "\"sha256:%s\",\"size\":%zu,\"function\":\"f\",\"daemon\":true}",
                        i ? "," : "", t[i].name, t[i].hex, t[i].size);
    snprintf(doc + len, sizeof doc - (size_t)len, "]}");
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
    /* Two buffers: a and b fetch, c waits for one. */
    CHECK_CONTAINS(fake_state(), "{\"name\":\"c\",\"spec_hash\":\"h\",\"owner\":\"o\",\"state\":"
                                 "\"Pending\",\"restarts\":0,\"runs\":0,\"reason\":\"waiting for a "
                                 "module buffer (all 2 in use)\"}");
    fake_serve(hex_b, mod_b, sizeof mod_b);
    fake_serve(hex_a, mod_a, sizeof mod_a);
    fake_serve(hex_a, mod_a, sizeof mod_a); /* the second window */
    CHECK_INT(fake.nstarts, 2);
    if (fake.nstarts < 2) {
        printf("%s\n", fake_state());
        return;
    }
    const uint8_t *running_a = fake.starts[0].module, *running_b = fake.starts[1].module;
    CHECK(memcmp(running_a, mod_b, sizeof mod_b) == 0 || memcmp(running_a, mod_a, sizeof mod_a) == 0);
    /* Chunks and offers for running modules change nothing. */
    CHECK_INT(fake_offer(hex_b, sizeof mod_b, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_b, 0, wrong, 1024), PB_E_DROPPED);
    CHECK_INT(fake_offer(hex_a, 70000, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_a, 0, wrong, 1024), PB_E_DROPPED);
    CHECK(memcmp(fake.starts[0].len == sizeof mod_a ? running_a : running_b, mod_a, sizeof mod_a) == 0);
    CHECK(memcmp(fake.starts[0].len == sizeof mod_a ? running_b : running_a, mod_b, sizeof mod_b) == 0);
    CHECK_CONTAINS(fake_state(), "waiting for a module buffer (all 2 in use)");
    /* While b's run ends and b waits to restart, its buffer stays: c still waits. */
    int slot_b = fake.starts[0].len == sizeof mod_b ? fake.starts[0].slot : fake.starts[1].slot;
    pb_task_finished(fake.core, slot_b, PB_RUN_OK, 0, 0, NULL);
    CHECK_CONTAINS(fake_state(), "waiting for a module buffer (all 2 in use)");
    /* b leaves the set: once its run is over its buffer goes to c. */
    len = snprintf(doc, sizeof doc, "{\"generation\":2,\"tasks\":[");
    for (int i = 0; i < 3; i += 2)
        len += snprintf(doc + len, sizeof doc - (size_t)len,
                        "%s{\"name\":\"%s\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":"
                        "\"sha256:%s\",\"size\":%zu,\"function\":\"f\",\"daemon\":true}",
                        i ? "," : "", t[i].name, t[i].hex, t[i].size);
    snprintf(doc + len, sizeof doc - (size_t)len, "]}");
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
    CHECK_CONTAINS(last_request(), hex_c);
    fake_serve(hex_c, wrong, sizeof wrong);
    CHECK_INT(fake.nstarts, 3);
    CHECK(memcmp(fake.starts[2].module, wrong, sizeof wrong) == 0);
    CHECK(memcmp(fake.starts[0].len == sizeof mod_a ? running_a : running_b, mod_a, sizeof mod_a) == 0);
}

static void resume_after_broker_drop(void)
{
    setup();
    want(1, "t", hex_a, 10000, "\"function\":\"f\"");
    CHECK(strstr(last_request(), "\"chunks\"") == NULL);
    CHECK_INT(fake_offer(hex_a, 10000, 1024), PB_OK);
    static const uint32_t got[] = {0, 1, 2, 3, 4, 7};
    for (size_t k = 0; k < 6; k++)
        CHECK_INT(fake_chunk(hex_a, got[k], mod_a + got[k] * 1024, 1024), PB_OK);
    pb_on_disconnect(fake.core);
    fake_clear_msgs();
    fake.now += 10;
    fake_connect();
    CHECK_INT(fake_count("/artifacts/request"), 1);
    CHECK_CONTAINS(last_request(), "\"chunk_size\":1024,\"chunks\":[5,6,8,9]}");
    /* The resumed offer keeps what arrived. */
    CHECK_INT(fake_offer(hex_a, 10000, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_a, 5, mod_a + 5 * 1024, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_a, 6, mod_a + 6 * 1024, 1024), PB_OK);
    CHECK_INT(fake_chunk(hex_a, 8, mod_a + 8 * 1024, 1024), PB_OK);
    CHECK_INT(fake.nstarts, 0);
    CHECK_INT(fake_chunk(hex_a, 9, mod_a + 9 * 1024, 10000 - 9 * 1024), PB_OK);
    CHECK_INT(fake.nstarts, 0); /* 10000 bytes of mod_a are not mod_a: a mismatch */
    /* With the real content it completes. */
    setup();
    want(1, "t", hex_a, sizeof mod_a, "\"function\":\"f\"");
    fake_serve(hex_a, mod_a, sizeof mod_a);
    pb_on_disconnect(fake.core);
    fake_clear_msgs();
    fake_connect();
    CHECK_CONTAINS(last_request(), "\"chunks\":[32,33,34,35,36,37,38,39]}");
    fake_serve(hex_a, mod_a, sizeof mod_a);
    CHECK_INT(fake.nstarts, 1);
}

static void request_windows(void)
{
    setup();
    want(1, "t", hex_a, sizeof mod_a, "\"function\":\"f\"");
    char expect[512] = "\"chunks\":[0";
    for (int i = 1; i < PB_REQUEST_WINDOW; i++)
        snprintf(expect + strlen(expect), sizeof expect - strlen(expect), ",%d", i);
    strcat(expect, "]}");
    CHECK_CONTAINS(last_request(), expect);
    int before = fake_count("/artifacts/request");
    fake_serve(hex_a, mod_a, sizeof mod_a);
    /* The window arrived: the next one was asked for at once. */
    CHECK_INT(fake_count("/artifacts/request"), before + 1);
    CHECK_CONTAINS(last_request(), "\"chunks\":[32,33,34,35,36,37,38,39]}");
    fake_serve(hex_a, mod_a, sizeof mod_a);
    CHECK_INT(fake.nstarts, 1);
    CHECK(memcmp(fake.starts[0].module, mod_a, sizeof mod_a) == 0);
}

static void stall_requests_back_off(void)
{
    setup();
    want(1, "t", hex_a, 10000, "\"function\":\"f\"");
    CHECK_INT(fake_offer(hex_a, 10000, 1024), PB_OK);
    for (uint32_t i = 0; i < 3; i++)
        CHECK_INT(fake_chunk(hex_a, i, mod_a + i * 1024, 1024), PB_OK);
    int64_t t0 = fake.now;
    fake_clear_msgs();
    pb_tick(fake.core, t0 + PB_STALL_MS - 1);
    CHECK_INT(fake_count("/artifacts/request"), 0);
    int64_t times[32];
    int n = 0;
    for (int64_t t = t0 + PB_STALL_MS; t <= t0 + 30000; t += 100) {
        int before = fake_count("/artifacts/request");
        fake.now = t;
        pb_tick(fake.core, t);
        if (fake_count("/artifacts/request") > before && n < 32)
            times[n++] = t;
    }
    CHECK(n >= 5 && n <= 12);
    CHECK_CONTAINS(last_request(), "\"chunks\":[3,4,5,6,7,8,9]}");
    for (int i = 2; i < n; i++)
        CHECK(times[i] - times[i - 1] >= times[i - 1] - times[i - 2]);
    CHECK(n < 2 || times[n - 1] - times[n - 2] <= PB_BACKOFF_MAX_MS + 100);
    /* Progress resets the backoff. */
    CHECK_INT(fake_chunk(hex_a, 3, mod_a + 3 * 1024, 1024), PB_OK);
    int before = fake_count("/artifacts/request");
    fake.now += PB_STALL_MS;
    pb_tick(fake.core, fake.now);
    CHECK_INT(fake_count("/artifacts/request"), before + 1);
    CHECK_CONTAINS(last_request(), "\"chunks\":[4,5,6,7,8,9]}");
}

static void offer_error_keeps_pending(void)
{
    setup();
    want(1, "t", hex_b, sizeof mod_b, "\"function\":\"f\",\"image\":\"registry.local/x:1\"");
    CHECK_CONTAINS(last_request(), "\"image\":\"registry.local/x:1\"}");
    char suffix[128], body[512];
    snprintf(suffix, sizeof suffix, "artifacts/%s/offer", hex_b);
    snprintf(body, sizeof body,
             "{\"digest\":\"sha256:%s\",\"size\":0,\"chunk_size\":1024,\"chunks\":0,\"error\":"
             "\"registry unreachable: connection refused\"}", hex_b);
    CHECK_INT(fake_deliver_str(suffix, body), PB_OK);
    char reason[512];
    snprintf(reason, sizeof reason, "\"state\":\"Pending\",\"restarts\":0,\"runs\":0,\"reason\":"
             "\"artifact sha256:%s unavailable: registry unreachable: connection refused "
             "(retrying)\"}", hex_b);
    CHECK_CONTAINS(fake_state(), reason);
    int requests = fake_count("/artifacts/request");
    pb_tick(fake.core, fake.now + 2 * PB_BACKOFF_INITIAL_MS - 1);
    CHECK_INT(fake_count("/artifacts/request"), requests);
    fake.now += 2 * PB_BACKOFF_INITIAL_MS;
    pb_tick(fake.core, fake.now);
    CHECK_INT(fake_count("/artifacts/request"), requests + 1);
    CHECK_CONTAINS(fake_state(), reason); /* the reason stays until the server answers */
    fake_serve(hex_b, mod_b, sizeof mod_b);
    CHECK_INT(fake.nstarts, 1);
}

static void stray_messages(void)
{
    setup();
    want(1, "t", hex_b, sizeof mod_b, "\"function\":\"f\"");
    /* A chunk of an artifact nobody waits for, an offer for another digest, a mismatched
     * offer, a foreign topic: all dropped, nothing changes. */
    CHECK_INT(fake_chunk(hex_a, 0, mod_a, 1024), PB_E_DROPPED);
    CHECK_INT(fake_offer(hex_a, 100, 1024), PB_OK);
    char suffix[128], body[512];
    snprintf(suffix, sizeof suffix, "artifacts/%s/offer", hex_b);
    snprintf(body, sizeof body, "{\"digest\":\"sha256:%s\",\"size\":3000,\"chunk_size\":1024,"
             "\"chunks\":3}", hex_a);
    CHECK_INT(fake_deliver_str(suffix, body), PB_E_DROPPED);
    snprintf(body, sizeof body, "{\"digest\":\"sha256:%s\",\"size\":3000,\"chunk_size\":1024,"
             "\"chunks\":4}", hex_b);
    CHECK_INT(fake_deliver_str(suffix, body), PB_E_DROPPED);
    snprintf(body, sizeof body, "{\"digest\":\"sha256:%s\",\"size\":3000,\"chunk_size\":32,"
             "\"chunks\":94}", hex_b);
    CHECK_INT(fake_deliver_str(suffix, body), PB_E_DROPPED);
    CHECK_INT(pb_message(fake.core, "m/other/c/default/proplets/board-7/desired",
                         (const uint8_t *)"{}", 2), PB_E_DROPPED);
    CHECK_INT(fake_deliver_str("unknown", "{}"), PB_E_DROPPED);
    CHECK_INT(fake_deliver_str("state", "{}"), PB_OK); /* its own retained state echoing back */
    CHECK_INT(fake_chunk(hex_b, 0, mod_b, 1024), PB_E_DROPPED); /* no offer yet */
    fake_serve(hex_b, mod_b, sizeof mod_b);
    CHECK_INT(fake.nstarts, 1);
}

static int seam_calls;
static int seam(void *ctx, const uint8_t *data, size_t len, uint8_t out[32])
{
    (void)ctx;
    seam_calls++;
    pb_sha256(data, len, out);
    return 0;
}

static void shared_module_and_sha_seam(void)
{
    setup();
    fake.platform.sha256 = seam;
    seam_calls = 0;
    int len = snprintf(doc, sizeof doc, "{\"generation\":1,\"tasks\":[");
    for (int i = 0; i < 2; i++)
        len += snprintf(doc + len, sizeof doc - (size_t)len,
                        "%s{\"name\":\"t%d\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":"
                        "\"sha256:%s\",\"size\":%zu,\"function\":\"f\"}",
                        i ? "," : "", i, hex_b, sizeof mod_b);
    snprintf(doc + len, sizeof doc - (size_t)len, "]}");
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
    CHECK_INT(fake_count("/artifacts/request"), 1);
    fake_serve(hex_b, mod_b, sizeof mod_b);
    CHECK_INT(seam_calls, 1);
    CHECK_INT(fake.nstarts, 2);
    CHECK(fake.starts[0].module == fake.starts[1].module);
}

void suite_artifact(void)
{
    RUN(truncated_chunk_refused);
    RUN(reordered_duplicated_sliced);
    RUN(digest_mismatch_then_success);
    RUN(module_larger_than_buffer);
    RUN(running_module_untouched);
    RUN(resume_after_broker_drop);
    RUN(request_windows);
    RUN(stall_requests_back_off);
    RUN(offer_error_keeps_pending);
    RUN(stray_messages);
    RUN(shared_module_and_sha_seam);
}
