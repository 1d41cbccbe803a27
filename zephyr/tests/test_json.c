/* The streaming scanner and the desired-set reader: any slicing gives the same result;
 * unknown keys, nulls and nesting are tolerated; malformed input is dropped with the state
 * unchanged. */
#include <stdio.h>
#include <stdlib.h>

#include "fake.h"
#include "harness.h"

static char trace[4096];
static char sink_buf[64];

static void add(const char *s)
{
    size_t n = strlen(trace);
    snprintf(trace + n, sizeof trace - n, "%s ", s);
}

static int tracer(struct pb_json *j, int ev)
{
    char item[128];
    switch (ev) {
    case PB_JEV_OBJ_BEGIN: add("{"); break;
    case PB_JEV_OBJ_END: add("}"); break;
    case PB_JEV_ARR_BEGIN: add("["); break;
    case PB_JEV_ARR_END: add("]"); break;
    case PB_JEV_KEY:
        snprintf(item, sizeof item, "k:%s%s@%d", j->key, j->key_over ? "+" : "", j->depth);
        add(item);
        break;
    case PB_JEV_STR_BEGIN:
        j->sink = sink_buf;
        j->sink_cap = 8;
        break;
    case PB_JEV_STR_END:
        snprintf(item, sizeof item, "s:%s%s", sink_buf, j->sink_over ? "+" : "");
        add(item);
        break;
    case PB_JEV_NUM:
        snprintf(item, sizeof item, "n%d:%lld", j->num_kind, (long long)j->num);
        add(item);
        break;
    case PB_JEV_TRUE: add("T"); break;
    case PB_JEV_FALSE: add("F"); break;
    default: add("N"); break;
    }
    return 0;
}

static bool scan(const char *text, size_t slice)
{
    struct pb_json j;
    trace[0] = 0;
    pb_json_begin(&j, tracer, NULL);
    size_t n = strlen(text);
    for (size_t at = 0; at < n; at += slice)
        pb_json_feed(&j, (const uint8_t *)text + at, n - at < slice ? n - at : slice);
    return pb_json_end(&j);
}

static void scanner_events(void)
{
    const char *doc = " {\"a\" : [1, -2.5e3, {\"b\":null}], \"c\":\"x\\u00e9\\ud83d\\ude00\\n\","
                      "\"d\":true,\"e\":false,\"big\":123456789012345678901234,\"k\":{},"
                      "\"long\":\"abcdefghijkl\",\"a-very-long-key-longer-than-kept\":0} ";
    CHECK(scan(doc, strlen(doc)));
    char whole[4096];
    snprintf(whole, sizeof whole, "%s", trace);
    CHECK_STR(whole, "{ k:a@1 [ n0:1 n1:0 { k:b@3 N } ] k:c@1 s:x\xc3\xa9\xf0\x9f\x98\x80\n "
                     "k:d@1 T k:e@1 F k:big@1 n2:0 k:k@1 { } k:long@1 s:abcdefgh+ "
                     "k:a-very-long-key-longer-t+@1 n0:0 } ");
    for (size_t slice = 1; slice < strlen(doc); slice++) {
        CHECK(scan(doc, slice));
        CHECK_STR(trace, whole);
    }
}

static void scanner_rejects(void)
{
    static const char *bad[] = {
        "",
        "{",
        "{\"a\":1",
        "{\"a\":1,}",
        "{\"a\" 1}",
        "{a:1}",
        "[1,]",
        "[1 2]",
        "{\"a\":01}",
        "{\"a\":-}",
        "{\"a\":1.}",
        "{\"a\":1e}",
        "{\"a\":.5}",
        "{\"a\":+1}",
        "{\"a\":tru}",
        "{\"a\":nul}",
        "{\"a\":True}",
        "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12G4\"}",
        "{\"a\":\"\\ud83d\"}",
        "{\"a\":\"\\ud83dx\"}",
        "{\"a\":\"\\ude00\"}",
        "{\"a\":\"\\u0000\"}",
        "{\"a\":\"tab\there\"}",
        "{\"a\":\"\xc3\"}",
        "{\"a\":\"\xc0\xaf\"}",
        "{\"a\":\"\xed\xa0\x80\"}",
        "{\"a\":\"\xf4\x90\x80\x80\"}",
        "{\"a\":\"\xff\"}",
        "{\"a\":1}x",
        "{\"a\":1}{}",
        "{\"a\":1]",
        "[1}",
        "{\"a\":\"unterminated",
        "{\"a\":123456789012345678901234567890123456789012345}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        for (size_t slice = 1; slice <= 3; slice++) {
            if (scan(bad[i], slice)) {
                char what[256];
                snprintf(what, sizeof what, "accepted malformed input #%zu: %s", i, bad[i]);
                pb_check_failed(__FILE__, __LINE__, what);
            }
        }
    }
    /* Deep nesting is refused at the limit, not followed. */
    char deep[256] = "";
    for (int i = 0; i < PB_JSON_DEPTH + 1; i++)
        strcat(deep, "[");
    for (int i = 0; i < PB_JSON_DEPTH + 1; i++)
        strcat(deep, "]");
    CHECK(!scan(deep, 1));
    deep[0] = 0;
    for (int i = 0; i < PB_JSON_DEPTH; i++)
        strcat(deep, "[");
    for (int i = 0; i < PB_JSON_DEPTH; i++)
        strcat(deep, "]");
    CHECK(scan(deep, 1));
}

/* ---- desired sets through the core ---- */

static char fixture[8192];

static void desired_any_slicing(void)
{
    long n = fake_fixture("desired_board.json", fixture, sizeof fixture);
    CHECK(n > 0);
    fake_reset(true);
    fake.quiet = true;
    fake_core();
    fake_connect();
    CHECK_INT(fake_deliver("desired", fixture, (size_t)n), PB_OK);
    char expected[FAKE_PAYLOAD + 1];
    snprintf(expected, sizeof expected, "%s", fake_state());
    CHECK_CONTAINS(expected, "\"observed_generation\":12");
    for (long slice = 1; slice <= n; slice++) {
        fake_reset(true);
        fake.quiet = true;
        pb_core *c = fake_core();
        fake_connect();
        pb_message_begin(c, "m/default/c/default/proplets/board-7/desired", (size_t)n);
        for (long at = 0; at < n; at += slice)
            pb_message_data(c, (const uint8_t *)fixture + at, (size_t)(n - at < slice ? n - at : slice));
        CHECK_INT(pb_message_end(c), PB_OK);
        CHECK_STR(fake_state(), expected);
    }
}

static void desired_board_fixture(void)
{
    long n = fake_fixture("desired_board.json", fixture, sizeof fixture);
    fake_reset(true);
    fake_core();
    fake_connect();
    CHECK_INT(fake_deliver("desired", fixture, (size_t)n), PB_OK);
    const char *state = fake_state();
    CHECK_CONTAINS(state, "{\"name\":\"cmd\",\"spec_hash\":\"c1\",\"owner\":\"propctl\","
                          "\"state\":\"Failed\",\"restarts\":0,\"runs\":0,"
                          "\"reason\":\"no function given: a wamr board calls an exported function "
                          "and cannot run a WASI command\"}");
    CHECK_CONTAINS(state, "{\"name\":\"add\",\"spec_hash\":\"a1\",\"owner\":\"propctl\","
                          "\"state\":\"Pending\",\"restarts\":0,\"runs\":0,"
                          "\"reason\":\"waiting for artifact sha256:306efd79979ee5c25ea21c01e1c86"
                          "d1afa2fd04188bb7e007e46255f22d6fe49 (request 1)\"}");
    /* The image task names the reference: the request carries it so a proxy can find it. */
    const struct fake_msg *req = fake_last("/artifacts/request");
    CHECK(req != NULL);
    if (req != NULL)
        CHECK_CONTAINS(req->payload, "\"image\":\"registry.local/team/app:1.0\"");
    /* The docs' example too. */
    n = fake_fixture("desired.json", fixture, sizeof fixture);
    fake_reset(true);
    fake_core();
    fake_connect();
    CHECK_INT(fake_deliver("desired", fixture, (size_t)n), PB_OK);
    CHECK_INT(pb_observed_generation(fake.core), 7);
}

static void unknown_keys_and_nulls(void)
{
    fake_reset(true);
    fake_core();
    fake_connect();
    char doc[4096];
    snprintf(doc, sizeof doc,
             "{\"future\":{\"a\":[1,{\"b\":[[],{}]},\"x\"],\"n\":null},\"issued_at\":null,"
             "\"issuer\":null,\"generation\":3,\"extra\":[true,false,null,1.5e10],"
             "\"tasks\":[{\"name\":\"t1\",\"spec_hash\":\"h1\",\"owner\":\"o\","
             "\"digest\":\"sha256:%s\",\"size\":10,\"function\":\"f\",\"image\":null,"
             "\"args\":null,\"env\":null,\"stdin\":null,\"memory\":null,\"timeout_ms\":null,"
             "\"fuel\":null,\"daemon\":null,\"inputs\":null},"
             "{\"name\":\"t2\",\"spec_hash\":\"h2\",\"owner\":\"o\",\"digest\":\"sha256:%s\","
             "\"size\":10,\"function\":\"f\",\"inputs\":[{\"name\":\"x\",\"deep\":[[[1]]]}]}],"
             "\"trailing\":\"ok\"}",
             fake_digest_hex, fake_digest_hex);
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
    CHECK_INT(pb_observed_generation(fake.core), 3);
    const char *state = fake_state();
    CHECK_CONTAINS(state, "{\"name\":\"t1\",\"spec_hash\":\"h1\",\"owner\":\"o\",\"state\":\"Pending\"");
    CHECK_CONTAINS(state, "{\"name\":\"t2\",\"spec_hash\":\"h2\",\"owner\":\"o\",\"state\":\"Failed\","
                          "\"restarts\":0,\"runs\":0,"
                          "\"reason\":\"field 'inputs' is not supported on a wamr board\"}");
}

struct bad_case {
    const char *what;
    const char *doc; /* %s: a valid digest hex */
};

static void malformed_desired_dropped(void)
{
    static const struct bad_case cases[] = {
        {"truncated", "{\"generation\":9,\"tasks\":[{\"name\":\"a\""},
        {"not an object", "[1,2]"},
        {"string generation", "{\"generation\":\"9\",\"tasks\":[]}"},
        {"float generation", "{\"generation\":9.0,\"tasks\":[]}"},
        {"zero generation", "{\"generation\":0,\"tasks\":[]}"},
        {"no generation", "{\"tasks\":[]}"},
        {"huge generation", "{\"generation\":99999999999999999999,\"tasks\":[]}"},
        {"generation above 2^53-1", "{\"generation\":9007199254740992,\"tasks\":[]}"},
        {"tasks object", "{\"generation\":9,\"tasks\":{}}"},
        {"task not an object", "{\"generation\":9,\"tasks\":[1]}"},
        {"task without digest",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"size\":1,\"function\":\"f\"}]}"},
        {"string size",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":\"1\"}]}"},
        {"negative size",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":-1}]}"},
        {"daemon string",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1,\"daemon\":\"yes\"}]}"},
        {"integer argument",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1,\"args\":[1]}]}"},
        {"env value not a string",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1,\"env\":{\"A\":1}}]}"},
        {"name not a DNS label",
         "{\"generation\":9,\"tasks\":[{\"name\":\"A_b\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1}]}"},
        {"name longer than 63",
         "{\"generation\":9,\"tasks\":[{\"name\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1}]}"},
        {"upper-case digest",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:306EFD79979EE5C25EA21C01E1C86D1AFA2FD04188BB7E007E46255F22D6FE49\",\"size\":1}]}"},
        {"memory below the minimum",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1,\"memory\":100}]}"},
        {"duplicate task",
         "{\"generation\":9,\"tasks\":[{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1},{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"o\",\"digest\":\"sha256:%s\",\"size\":1}]}"},
        {"bad escape", "{\"generation\":9,\"issuer\":\"a\\qb\",\"tasks\":[]}"},
        {"deep nesting", "{\"generation\":9,\"x\":[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]}"},
        {"trailing data", "{\"generation\":9,\"tasks\":[]}}"},
        {"negative issued_at", "{\"generation\":9,\"issued_at\":-1,\"tasks\":[]}"},
    };
    char doc[1024];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fake_reset(true);
        fake.quiet = true;
        pb_core *c = fake_core();
        fake_connect();
        fake_desired_one(doc, sizeof doc, 5, "keep", "k1", fake_digest_hex, 10, "\"function\":\"f\"");
        CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
        char before[FAKE_PAYLOAD + 1];
        snprintf(before, sizeof before, "%s", fake_state());
        int states = fake_count("/state");
        snprintf(doc, sizeof doc, cases[i].doc, fake_digest_hex, fake_digest_hex);
        int r = fake_deliver_str("desired", doc);
        if (r != PB_E_DROPPED || pb_observed_generation(c) != 5 ||
            fake_count("/state") != states) {
            char what[256];
            snprintf(what, sizeof what, "case '%s' was not dropped cleanly", cases[i].what);
            pb_check_failed(__FILE__, __LINE__, what);
        }
        CHECK(pb_last_error(c)[0] != 0);
        CHECK_STR(fake_state(), before);
    }
}

static void every_truncation_dropped(void)
{
    long n = fake_fixture("desired_board.json", fixture, sizeof fixture);
    for (long cut = 0; cut < n; cut++) {
        fake_reset(true);
        fake.quiet = true;
        pb_core *c = fake_core();
        fake_connect();
        int states = fake_count("/state");
        /* Both a short message and one whose stream ends early are dropped. */
        int r1 = fake_deliver("desired", fixture, (size_t)cut);
        pb_message_begin(c, "m/default/c/default/proplets/board-7/desired", (size_t)n);
        pb_message_data(c, (const uint8_t *)fixture, (size_t)cut);
        int r2 = pb_message_end(c);
        if ((cut > 0 && r1 != PB_E_DROPPED) || r2 != PB_E_DROPPED ||
            pb_observed_generation(c) != 0 || fake_count("/state") != states) {
            char what[128];
            snprintf(what, sizeof what, "truncation at %ld not dropped", cut);
            pb_check_failed(__FILE__, __LINE__, what);
            break;
        }
    }
    /* More bytes than announced. */
    fake_reset(true);
    fake.quiet = true;
    pb_core *c = fake_core();
    pb_message_begin(c, "m/default/c/default/proplets/board-7/desired", 10);
    pb_message_data(c, (const uint8_t *)fixture, (size_t)n);
    CHECK_INT(pb_message_end(c), PB_E_DROPPED);
}

static void overlong_strings_fail_the_task(void)
{
    char extra[512], doc[2048], fn[201];
    memset(fn, 'f', 200);
    fn[200] = 0;
    struct {
        const char *extra;
        const char *reason;
    } cases[] = {
        {"\"function\":\"%s\"", "function is longer than the 64 characters this board keeps"},
        {"\"function\":\"f\",\"args\":[\"123456789012345678901234567890\"]",
         "argument 1 is not an integer: a wamr board passes int64 arguments"},
        {"\"function\":\"f\",\"args\":[\"1\",\"2x\"]",
         "argument 2 is not an integer: a wamr board passes int64 arguments"},
        {"\"function\":\"f\",\"args\":[\"9223372036854775808\"]",
         "argument 1 is not an integer: a wamr board passes int64 arguments"},
        {"\"function\":\"f\",\"args\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\"]",
         "more than 8 arguments: this board passes at most 8"},
        {"\"function\":\"f\",\"stdin\":\"\"", "stdin is not supported on a wamr board"},
        {"\"args\":[\"1\"]", "no function given: a wamr board calls an exported function and "
                             "cannot run a WASI command"},
        {"\"function\":\"f\",\"env\":{\"A\":\"1\"}", "env is not supported on a wamr board"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fake_reset(true);
        fake_core();
        fake_connect();
        snprintf(extra, sizeof extra, cases[i].extra, fn);
        fake_desired_one(doc, sizeof doc, 1, "t", "h", fake_digest_hex, 10, extra);
        CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
        char expect[512];
        snprintf(expect, sizeof expect, "\"state\":\"Failed\",\"restarts\":0,\"runs\":0,\"reason\":\"%s\"",
                 cases[i].reason);
        CHECK_CONTAINS(fake_state(), expect);
        CHECK_INT(fake_count("/artifacts/request"), 0);
        CHECK_INT(fake.nstarts, 0);
    }
    /* Negative and extreme integers parse exactly. */
    fake_reset(true);
    fake_core();
    fake_connect();
    fake_desired_one(doc, sizeof doc, 1, "t", "h", fake_digest_hex, 10,
                     "\"function\":\"f\",\"args\":[\"-9223372036854775808\",\"9223372036854775807\",\"0\",\"-0\"]");
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
    CHECK_CONTAINS(fake_state(), "\"state\":\"Pending\"");
}

void suite_json(void)
{
    RUN(scanner_events);
    RUN(scanner_rejects);
    RUN(desired_any_slicing);
    RUN(desired_board_fixture);
    RUN(unknown_keys_and_nulls);
    RUN(malformed_desired_dropped);
    RUN(every_truncation_dropped);
    RUN(overlong_strings_fail_the_task);
}
