/* Encoders against the shared fixtures (the JSON files in zephyr/fixtures, checked by pydantic on the
 * Python side): the board's bytes must equal pydantic's for the same message. */
#include <stdio.h>

#include "fake.h"
#include "harness.h"

static char expected[8192];
static char got[8192];

static const char *fx(const char *name)
{
    if (fake_fixture(name, expected, sizeof expected) < 0)
        snprintf(expected, sizeof expected, "(missing fixture %s)", name);
    return expected;
}

static struct pb_ident board7(void)
{
    struct pb_ident id;
    memset(&id, 0, sizeof id);
    strcpy(id.id, "board-7");
    strcpy(id.domain, "default");
    strcpy(id.channel, "default");
    strcpy(id.version, "0.1.0");
    strcpy(id.label_keys[0], "zone");
    strcpy(id.label_values[0], "a");
    strcpy(id.label_keys[1], "mcu");
    strcpy(id.label_values[1], "nrf5340");
    id.label_count = 2;
    id.heartbeat_ms = 2500;
    return id;
}

static void seconds_like_python(void)
{
    static const struct {
        int64_t ms;
        const char *text;
    } cases[] = {
        {0, "0.0"},           {1, "0.001"},         {10, "0.01"},
        {100, "0.1"},         {1500, "1.5"},        {5000, "5.0"},
        {123456789, "123456.789"}, {1796416659480, "1796416659.48"},
        {1796416659482, "1796416659.482"}, {1796416650000, "1796416650.0"},
        {-5, "0.0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct pb_out o;
        pb_out_init(&o, got, sizeof got);
        pb_out_secs(&o, cases[i].ms);
        pb_out_end(&o);
        CHECK_STR(got, cases[i].text);
    }
}

static void announce_presence_will(void)
{
    struct pb_ident id = board7();
    CHECK(pb_encode_announce(&id, got, sizeof got) > 0);
    CHECK_STR(got, fx("announce.json"));
    CHECK(pb_encode_presence(&id, true, got, sizeof got) > 0);
    CHECK_STR(got, fx("presence.json"));
    /* Through the core: connect publishes the same bytes, and the will matches its fixture. */
    fake_reset(true);
    pb_core *c = fake_core();
    char topic[PB_TOPIC_MAX];
    CHECK_INT(pb_will(c, topic, sizeof topic, got, sizeof got), 36);
    CHECK_STR(topic, "m/default/c/default/proplets/board-7/presence");
    CHECK_STR(got, fx("presence_will.json"));
    CHECK_INT(pb_will(c, topic, sizeof topic, got, 10), PB_E_NOSPACE);
    fake_connect();
    const struct fake_msg *m = fake_last("/announce");
    CHECK(m != NULL && m->qos == 1 && !m->retain);
    if (m != NULL)
        CHECK_STR(m->payload, fx("announce.json"));
    m = fake_last("/presence");
    CHECK(m != NULL && m->qos == 1 && m->retain);
    if (m != NULL)
        CHECK_STR(m->payload, fx("presence.json"));
}

static void heartbeat(void)
{
    struct pb_ident id = board7();
    CHECK(pb_encode_heartbeat(&id, 42, 1796416659480, 1, 7, got, sizeof got) > 0);
    CHECK_STR(got, fx("heartbeat.json"));
}

static void reported_state(void)
{
    struct pb_ident id = board7();
    struct pb_status_view tasks[] = {
        {"blink", "b1", "propctl", PB_RUNNING, 2, 3, 1796416650000, -1, NULL, NULL},
        {"extra", "e1", "propctl", PB_PENDING, 0, 0, -1, -1, NULL,
         "not placed: the task table holds 4 tasks"},
        {"hello", "9d5428a05b621a40", "propctl", PB_COMPLETED, 0, 1, 1796416659470,
         1796416659480, "42", NULL},
        {"odd", "o1", "team/a \"b\"", PB_FAILED, 0, 0, -1, -1, NULL,
         "trap: \"x\\y\"\n\tunreachable \xc3\xa9 \x01 \x1f \x7f \xf0\x9f\x98\x80"},
    };
    CHECK(pb_encode_state(&id, 7, 1796416659482, tasks, 4, false, got, sizeof got) > 0);
    CHECK_STR(got, fx("state.json"));
    /* Too small a buffer is reported, never overrun. */
    CHECK_INT(pb_encode_state(&id, 7, 1796416659482, tasks, 4, false, got, 100), -1);
    CHECK_INT((int)strlen(got), 99);
    /* An empty board, through the core, with the wall clock at the epoch. */
    fake_reset(true);
    fake.wall = 0;
    struct pb_identity plain = {.proplet_id = "b"};
    CHECK(fake_core_with(&plain) != NULL);
    fake_connect();
    CHECK_STR(fake_state(), fx("state_empty.json"));
}

static void invalid_utf8_from_the_platform(void)
{
    struct pb_ident id = board7();
    struct pb_result_view r = {"t", "h", PB_FAILED, 1, 0, 0, -1, 0, "bad \xff\xc3 end \xe2\x82"};
    CHECK(pb_encode_result(&id, &r, got, sizeof got) > 0);
    CHECK_CONTAINS(got, "\"error\":\"bad ?? end ??\"}");
}

static void task_results(void)
{
    struct pb_ident id = board7();
    struct pb_result_view ok = {"hello", "9d5428a05b621a40", PB_COMPLETED, 1, 1796416659470,
                                1796416659480, 1, 42, NULL};
    CHECK(pb_encode_result(&id, &ok, got, sizeof got) > 0);
    CHECK_STR(got, fx("result.json"));
    struct pb_result_view none = {"blink", "b1", PB_COMPLETED, 3, 1796416650000, 1796416650001,
                                  0, 0, NULL};
    CHECK(pb_encode_result(&id, &none, got, sizeof got) > 0);
    CHECK_STR(got, fx("result_void.json"));
    struct pb_result_view failed = {"spin", "s1", PB_FAILED, 2, 1796416659100, 1796416659400,
                                    -1, 0, "timed out after 300 ms"};
    CHECK(pb_encode_result(&id, &failed, got, sizeof got) > 0);
    CHECK_STR(got, fx("result_failed.json"));
    struct pb_result_view neg = {"neg", "n1", PB_COMPLETED, 1, 1, 10, 1, INT64_MIN, NULL};
    CHECK(pb_encode_result(&id, &neg, got, sizeof got) > 0);
    CHECK_STR(got, fx("result_negative.json"));
}

static void artifact_requests(void)
{
    struct pb_ident id = board7();
    uint8_t digest[32];
    CHECK(pb_hex_decode(fake_digest_hex, 32, digest));
    uint32_t chunks[] = {3, 4};
    CHECK(pb_encode_request(&id, digest, 1024, chunks, 2, "", got, sizeof got) > 0);
    CHECK_STR(got, fx("request.json"));
    CHECK(pb_encode_request(&id, digest, 1024, NULL, 0, "registry.local/team/app:1.0", got,
                            sizeof got) > 0);
    CHECK_STR(got, fx("request_all.json"));
    CHECK_INT(pb_topic_request(&id, got, sizeof got), 37);
    CHECK_STR(got, "m/default/c/default/artifacts/request");
}

static void offers_read(void)
{
    /* The offer fixtures are what servers send: the core takes both. */
    fake_reset(true);
    fake_core();
    fake_connect();
    char doc[1024];
    fake_desired_one(doc, sizeof doc, 1, "t", "h", fake_digest_hex, 40000, "\"function\":\"f\"");
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
    char suffix[128];
    snprintf(suffix, sizeof suffix, "artifacts/%s/offer", fake_digest_hex);
    CHECK_INT(fake_deliver_str(suffix, fx("offer.json")), PB_OK);
    CHECK_INT(fake_deliver_str(suffix, fx("offer_error.json")), PB_OK);
    CHECK_CONTAINS(fake_state(), "\"reason\":\"artifact sha256:306efd79979ee5c25ea21c01e1c86d1afa2"
                                 "fd04188bb7e007e46255f22d6fe49 unavailable: not found: blob sha2");
}

void suite_encode(void)
{
    RUN(seconds_like_python);
    RUN(announce_presence_will);
    RUN(heartbeat);
    RUN(reported_state);
    RUN(invalid_utf8_from_the_platform);
    RUN(task_results);
    RUN(artifact_requests);
    RUN(offers_read);
}
