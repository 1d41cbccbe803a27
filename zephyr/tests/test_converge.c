/* Converging to desired sets with a recording platform: start, stop, restart, once per spec
 * across reboots, generation ordering, excess tasks, daemons, timeouts and start failures. */
#include <stdio.h>

#include "fake.h"
#include "harness.h"

static uint8_t module[300];
static char hex[65];
static char doc[8192];

struct task_def {
    const char *name, *hash, *extra;
};

static void desire(int64_t generation, const struct task_def *tasks, int n)
{
    int len = snprintf(doc, sizeof doc, "{\"generation\":%lld,\"tasks\":[", (long long)generation);
    for (int i = 0; i < n; i++)
        len += snprintf(doc + len, sizeof doc - (size_t)len,
                        "%s{\"name\":\"%s\",\"spec_hash\":\"%s\",\"owner\":\"propctl\","
                        "\"digest\":\"sha256:%s\",\"size\":%zu%s%s}",
                        i ? "," : "", tasks[i].name, tasks[i].hash, hex, sizeof module,
                        tasks[i].extra[0] ? "," : "", tasks[i].extra);
    snprintf(doc + len, sizeof doc - (size_t)len, "]}");
    CHECK_INT(fake_deliver_str("desired", doc), PB_OK);
}

static void setup(bool clear_kv)
{
    fake_reset(clear_kv);
    for (size_t i = 0; i < sizeof module; i++)
        module[i] = (uint8_t)(i * 7 + 3);
    fake_digest(module, sizeof module, hex);
    fake_core();
    fake_connect();
}

static void serve(void) { fake_serve(hex, module, sizeof module); }

static const char *result_of(const char *task)
{
    char suffix[96];
    snprintf(suffix, sizeof suffix, "/results/%s", task);
    const struct fake_msg *m = fake_last(suffix);
    return m != NULL ? m->payload : "(none)";
}

static void connect_sequence(void)
{
    setup(true);
    CHECK_INT(fake.nsubs, 2);
    CHECK_STR(fake.subs[0], "m/default/c/default/proplets/board-7/desired");
    CHECK_STR(fake.subs[1], "m/default/c/default/proplets/board-7/artifacts/#");
    CHECK_INT(fake.nmsgs, 4);
    CHECK_CONTAINS(fake.msgs[0].topic, "/presence");
    CHECK_CONTAINS(fake.msgs[1].topic, "/announce");
    CHECK_CONTAINS(fake.msgs[2].topic, "/state");
    CHECK(fake.msgs[2].retain && fake.msgs[2].qos == 1);
    CHECK_CONTAINS(fake.msgs[3].topic, "/heartbeat");
    CHECK(!fake.msgs[3].retain && fake.msgs[3].qos == 0);
    /* Heartbeats follow the period; none while disconnected. */
    pb_tick(fake.core, fake.now + 2499);
    CHECK_INT(fake_count("/heartbeat"), 1);
    pb_tick(fake.core, fake.now + 2500);
    CHECK_INT(fake_count("/heartbeat"), 2);
    CHECK_CONTAINS(fake_last("/heartbeat")->payload, "\"seq\":2,");
    CHECK(pb_next_deadline(fake.core) == fake.now + 5000);
    pb_on_disconnect(fake.core);
    pb_tick(fake.core, fake.now + 10000);
    CHECK_INT(fake_count("/heartbeat"), 2);
}

static void start_and_report(void)
{
    setup(true);
    struct task_def t = {"hello", "h1", "\"function\":\"add\",\"args\":[\"2\",\"40\"],\"memory\":"
                                        "131072,\"timeout_ms\":30000,\"fuel\":5000"};
    desire(7, &t, 1);
    const struct fake_msg *req = fake_last("/artifacts/request");
    CHECK(req != NULL);
    CHECK_INT(fake.nstarts, 0);
    serve();
    CHECK_INT(fake.nstarts, 1);
    struct fake_start *s = &fake.starts[0];
    CHECK_STR(s->function, "add");
    CHECK_INT(s->argc, 2);
    CHECK_INT(s->args[0], 2);
    CHECK_INT(s->args[1], 40);
    CHECK_INT(s->limits.memory, 131072);
    CHECK_INT(s->limits.timeout_ms, 30000);
    CHECK_INT(s->limits.fuel, 5000);
    CHECK_INT(s->len, sizeof module);
    CHECK(memcmp(s->module, module, sizeof module) == 0);
    CHECK_INT(pb_running(fake.core), 1);
    CHECK_CONTAINS(fake_state(), "\"state\":\"Running\",\"restarts\":0,\"runs\":1,"
                                 "\"started_at\":1796416659.0}");
    fake.wall = 1796416659480;
    pb_task_finished(fake.core, s->slot, PB_RUN_OK, 1, 42, NULL);
    const struct fake_msg *res = fake_last("/results/hello");
    CHECK(res != NULL && res->retain && res->qos == 1);
    CHECK_STR(result_of("hello"),
              "{\"proplet\":\"board-7\",\"task\":\"hello\",\"spec_hash\":\"h1\",\"state\":"
              "\"Completed\",\"runs\":1,\"started_at\":1796416659.0,\"finished_at\":1796416659.48,"
              "\"result\":[\"42\"],\"stdout\":\"\",\"stderr\":\"\",\"truncated\":false}");
    CHECK_CONTAINS(fake_state(), "\"observed_generation\":7,\"ts\":1796416659.48,\"tasks\":[{"
                                 "\"name\":\"hello\",\"spec_hash\":\"h1\",\"owner\":\"propctl\","
                                 "\"state\":\"Completed\",\"restarts\":0,\"runs\":1,\"started_at\":"
                                 "1796416659.0,\"finished_at\":1796416659.48,\"result\":\"42\"}]");
    /* The result came before the state that reports it. */
    CHECK(fake_last("/results/hello") < fake_last("/state"));
    /* A one-shot task does not run again. */
    pb_tick(fake.core, fake.now + 60000);
    CHECK_INT(fake.nstarts, 1);
}

static void stop_removed_and_clear_result(void)
{
    setup(true);
    struct task_def t[2] = {{"svc", "s1", "\"function\":\"run\",\"daemon\":true"},
                            {"once", "o1", "\"function\":\"f\""}};
    desire(1, t, 2);
    serve();
    CHECK_INT(fake.nstarts, 2);
    pb_task_finished(fake.core, fake.starts[1].slot, PB_RUN_OK, 0, 0, NULL);
    fake_clear_msgs();
    desire(2, t, 0);
    CHECK_INT(fake.nstops, 1);
    CHECK_INT(fake.stops[0], fake.starts[0].slot);
    const struct fake_msg *clear = fake_last("/results/svc");
    CHECK(clear != NULL && clear->len == 0 && clear->retain && clear->qos == 1);
    clear = fake_last("/results/once");
    CHECK(clear != NULL && clear->len == 0 && clear->retain);
    CHECK_CONTAINS(fake_state(), "\"tasks\":[]");
    int results = fake_count("/results/svc");
    /* The stopped run's end is not reported as a result of a task that is gone. */
    pb_task_finished(fake.core, fake.starts[0].slot, PB_RUN_STOPPED, 0, 0, "stopped");
    CHECK_INT(fake_count("/results/svc"), results);
    CHECK_INT(pb_running(fake.core), 0);
}

static void restart_on_spec_change(void)
{
    setup(true);
    struct task_def t = {"svc", "s1", "\"function\":\"run\",\"daemon\":true"};
    desire(1, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
    t.hash = "s2";
    t.extra = "\"function\":\"run2\",\"daemon\":true";
    desire(2, &t, 1);
    CHECK_INT(fake.nstops, 1);
    /* The new spec waits for a free slot only if there is none; here it starts at once. */
    CHECK_INT(fake.nstarts, 2);
    CHECK_STR(fake.starts[1].function, "run2");
    CHECK(fake.starts[1].slot != fake.starts[0].slot);
    CHECK_CONTAINS(fake_state(), "\"spec_hash\":\"s2\",\"owner\":\"propctl\",\"state\":\"Running\","
                                 "\"restarts\":0,\"runs\":1");
    /* The old run ending changes nothing about the new one. */
    pb_task_finished(fake.core, fake.starts[0].slot, PB_RUN_STOPPED, 0, 0, NULL);
    CHECK_INT(pb_running(fake.core), 1);
    CHECK_INT(fake_count("/results/svc"), 0);
    /* Same spec_hash again in a newer generation: nothing restarts. */
    desire(3, &t, 1);
    CHECK_INT(fake.nstarts, 2);
    CHECK_INT(fake.nstops, 1);
}

static void once_per_spec_across_reboots(void)
{
    setup(true);
    struct task_def t = {"once", "o1", "\"function\":\"f\""};
    desire(4, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
    pb_task_finished(fake.core, fake.starts[0].slot, PB_RUN_OK, 1, 42, NULL);
    /* Reboot: a new core, the same kv; the retained set arrives again. */
    setup(false);
    desire(4, &t, 1);
    CHECK_INT(fake_count("/artifacts/request"), 0);
    CHECK_INT(fake.nstarts, 0);
    CHECK_CONTAINS(fake_state(), "\"state\":\"Completed\",\"restarts\":0,\"runs\":1,\"started_at\":"
                                 "1796416659.0,\"finished_at\":1796416659.0,\"result\":\"42\"}");
    /* A new spec runs again. */
    t.hash = "o2";
    desire(5, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
    /* Removal forgets it: the same spec placed again later runs again. */
    desire(6, &t, 0);
    setup(false);
    desire(7, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
}

static void interrupted_run_restarts(void)
{
    setup(true);
    struct task_def t = {"once", "o1", "\"function\":\"f\""};
    desire(1, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
    setup(false); /* the board reset while it ran */
    desire(1, &t, 1);
    CHECK_CONTAINS(fake_state(), "\"restarts\":1,\"runs\":1");
    serve();
    CHECK_INT(fake.nstarts, 1);
    CHECK_CONTAINS(fake_state(), "\"state\":\"Running\",\"restarts\":1,\"runs\":2");
}

static void generation_ordering(void)
{
    setup(true);
    struct task_def a = {"a", "h1", "\"function\":\"f\""};
    struct task_def b = {"b", "h1", "\"function\":\"f\""};
    desire(5, &a, 1);
    int states = fake_count("/state");
    desire(3, &b, 1); /* older: ignored */
    desire(5, &b, 1); /* same generation: ignored */
    CHECK_INT(pb_observed_generation(fake.core), 5);
    CHECK_INT(fake_count("/state"), states);
    CHECK(strstr(fake_state(), "\"name\":\"b\"") == NULL);
    desire(6, &b, 1);
    CHECK_INT(pb_observed_generation(fake.core), 6);
    CHECK_CONTAINS(fake_state(), "\"name\":\"b\"");
    CHECK(strstr(fake_state(), "\"name\":\"a\"") == NULL);
    /* A cleared retained set is not an empty one: tasks stay. */
    CHECK_INT(fake_deliver("desired", "", 0), PB_OK);
    CHECK_INT(pb_observed_generation(fake.core), 6);
    CHECK_CONTAINS(fake_state(), "\"name\":\"b\"");
}

static void excess_tasks_reported_pending(void)
{
    setup(true);
    struct task_def held[2] = {{"e", "h", "\"function\":\"f\",\"daemon\":true"},
                               {"f", "h", "\"function\":\"f\",\"daemon\":true"}};
    desire(1, held, 2);
    serve();
    CHECK_INT(fake.nstarts, 2);
    struct task_def all[7] = {{"a", "h", "\"function\":\"f\""}, {"b", "h", "\"function\":\"f\""},
                              {"c", "h", "\"function\":\"f\""}, {"d", "h", "\"function\":\"f\""},
                              held[0], held[1], {"g", "h", "\"function\":\"f\""}};
    desire(2, all, 7);
    /* The running tasks kept their places. */
    CHECK_INT(fake.nstops, 0);
    const char *state = fake_state();
    CHECK_CONTAINS(state, "{\"name\":\"a\",\"spec_hash\":\"h\",\"owner\":\"propctl\",\"state\":"
                          "\"Pending\",\"restarts\":0,\"runs\":0,\"reason\":\"not placed: the task "
                          "table holds 4 tasks\"}");
    CHECK_CONTAINS(state, "{\"name\":\"b\",\"spec_hash\":\"h\",\"owner\":\"propctl\",\"state\":"
                          "\"Pending\",\"restarts\":0,\"runs\":0,\"reason\":\"not placed: the task "
                          "table holds 4 tasks\"}");
    CHECK_CONTAINS(state, "{\"name\":\"g\",\"spec_hash\":\"h\",\"owner\":\"propctl\",\"state\":"
                          "\"Pending\",\"restarts\":0,\"runs\":0,\"reason\":\"not placed: the task "
                          "table holds 4 tasks\"}");
    CHECK_CONTAINS(state, "{\"name\":\"c\"");
    CHECK_CONTAINS(state, "{\"name\":\"d\"");
    /* c and d ran (two slots were free); the others wait for a slot of the table. */
    CHECK_INT(fake.nstarts, 4);
    /* Placed once the table has room, with the next generation. */
    struct task_def fewer[3] = {all[0], all[1], all[6]};
    desire(3, fewer, 3);
    state = fake_state();
    CHECK(strstr(state, "not placed") == NULL);
    CHECK_CONTAINS(state, "{\"name\":\"g\"");
}

static void tasks_beyond_the_overflow_list_are_counted(void)
{
    setup(true);
    struct task_def all[10] = {
        {"a", "h", "\"function\":\"f\""}, {"b", "h", "\"function\":\"f\""},
        {"c", "h", "\"function\":\"f\""}, {"d", "h", "\"function\":\"f\""},
        {"e", "h", "\"function\":\"f\""}, {"f", "h", "\"function\":\"f\""},
        {"g", "h", "\"function\":\"f\""}, {"h", "h", "\"function\":\"f\""},
        {"i", "h", "\"function\":\"f\""}, {"j", "h", "\"function\":\"f\""}};
    desire(1, all, 10);
    const char *state = fake_state();
    /* 4 in the table, 4 named as not placed, and the last 2 counted in their reason. */
    CHECK_CONTAINS(state, "{\"name\":\"e\",\"spec_hash\":\"h\",\"owner\":\"propctl\",\"state\":"
                          "\"Pending\",\"restarts\":0,\"runs\":0,\"reason\":\"not placed: the task "
                          "table holds 4 tasks; 2 more tasks not placed are not listed\"}");
    CHECK_CONTAINS(state, "{\"name\":\"h\"");
    CHECK(strstr(state, "{\"name\":\"i\"") == NULL);
}

static void slots_are_shared(void)
{
    setup(true);
    struct task_def t[4] = {{"a", "h", "\"function\":\"f\",\"daemon\":true"},
                            {"b", "h", "\"function\":\"f\",\"daemon\":true"},
                            {"c", "h", "\"function\":\"f\",\"daemon\":true"},
                            {"d", "h", "\"function\":\"f\",\"daemon\":true"}};
    desire(1, t, 4);
    serve();
    CHECK_INT(fake.nstarts, 4);
    /* All four change spec: the old runs hold every slot until they end. */
    for (int i = 0; i < 4; i++)
        t[i].hash = "h2";
    desire(2, t, 4);
    CHECK_INT(fake.nstops, 4);
    CHECK_INT(fake.nstarts, 4);
    CHECK_CONTAINS(fake_state(), "waiting for a free slot (4 tasks running)");
    pb_task_finished(fake.core, fake.stops[0], PB_RUN_STOPPED, 0, 0, NULL);
    CHECK_INT(fake.nstarts, 5);
}

static void daemon_backoff(void)
{
    setup(true);
    struct task_def t = {"svc", "s1", "\"function\":\"run\",\"daemon\":true"};
    desire(1, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
    pb_task_finished(fake.core, fake.starts[0].slot, PB_RUN_TRAP, 0, 0, "boom");
    CHECK_CONTAINS(fake_state(), "\"state\":\"Failed\",\"restarts\":1,\"runs\":1,");
    CHECK_CONTAINS(fake_state(), "\"reason\":\"boom; restarting in 1s\"");
    CHECK_CONTAINS(result_of("svc"), "\"state\":\"Failed\",\"runs\":1,");
    CHECK_CONTAINS(result_of("svc"), "\"error\":\"boom\"}");
    CHECK(pb_next_deadline(fake.core) == fake.now + 1000);
    pb_tick(fake.core, fake.now + 999);
    CHECK_INT(fake.nstarts, 1);
    fake.now += 1000;
    pb_tick(fake.core, fake.now);
    CHECK_INT(fake.nstarts, 2);
    pb_task_finished(fake.core, fake.starts[1].slot, PB_RUN_OK, 0, 0, NULL);
    CHECK_CONTAINS(fake_state(), "\"reason\":\"exited; restarting in 2s\"");
    fake.now += 2000;
    pb_tick(fake.core, fake.now);
    CHECK_INT(fake.nstarts, 3);
    /* A long healthy run resets the backoff. */
    fake.now += PB_DAEMON_HEALTHY_MS;
    pb_task_finished(fake.core, fake.starts[2].slot, PB_RUN_OK, 0, 0, NULL);
    CHECK_CONTAINS(fake_state(), "restarting in 1s");
    CHECK_CONTAINS(fake_state(), "\"restarts\":3,\"runs\":3");
}

static void timeout_stops_a_spinning_task(void)
{
    setup(true);
    struct task_def t = {"spin", "s1", "\"function\":\"spin\",\"timeout_ms\":300"};
    desire(1, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
    int64_t started = fake.now;
    CHECK(pb_next_deadline(fake.core) == started + 300);
    pb_tick(fake.core, started + 299);
    CHECK_INT(fake.nstops, 0);
    pb_tick(fake.core, started + 300);
    CHECK_INT(fake.nstops, 1);
    pb_tick(fake.core, started + 400); /* asked once only */
    CHECK_INT(fake.nstops, 1);
    pb_task_finished(fake.core, fake.starts[0].slot, PB_RUN_STOPPED, 0, 0, "terminated");
    CHECK_CONTAINS(result_of("spin"), "\"state\":\"Failed\",\"runs\":1,");
    CHECK_CONTAINS(result_of("spin"), "\"error\":\"timed out after 300 ms\"}");
    CHECK_CONTAINS(fake_state(), "\"state\":\"Failed\",\"restarts\":0,\"runs\":1,");
    CHECK_CONTAINS(fake_state(), "\"reason\":\"timed out after 300 ms\"}");
    /* The same when the runtime ends the run inside wasm_stop. */
    setup(true);
    fake.stop_at_once = true;
    desire(1, &t, 1);
    serve();
    pb_tick(fake.core, fake.now + 300);
    CHECK_INT(pb_running(fake.core), 0);
    CHECK_CONTAINS(result_of("spin"), "\"error\":\"timed out after 300 ms\"}");
}

static void start_failures_and_synchronous_runs(void)
{
    setup(true);
    fake.start_rc = -5;
    struct task_def t = {"bad", "b1", "\"function\":\"f\""};
    desire(1, &t, 1);
    serve();
    CHECK_INT(fake.nstarts, 1);
    CHECK_INT(pb_running(fake.core), 0);
    CHECK_CONTAINS(fake_state(), "\"state\":\"Failed\"");
    CHECK_CONTAINS(fake_state(), "the runtime could not start it (error -5)");
    CHECK_CONTAINS(result_of("bad"), "\"error\":\"the runtime could not start it (error -5)\"");
    /* A runtime that finishes inside wasm_start: every task still runs exactly once. */
    setup(true);
    fake.finish_at_once = true;
    struct task_def many[4] = {{"a", "h", "\"function\":\"f\""}, {"b", "h", "\"function\":\"f\""},
                               {"c", "h", "\"function\":\"f\""}, {"d", "h", "\"function\":\"f\""}};
    desire(1, many, 4);
    serve();
    CHECK_INT(fake.nstarts, 4);
    CHECK_INT(pb_running(fake.core), 0);
    CHECK_INT(fake_count("/results/a") + fake_count("/results/b") + fake_count("/results/c") +
                  fake_count("/results/d"), 4);
    CHECK_CONTAINS(fake_state(), "{\"name\":\"d\",\"spec_hash\":\"h\",\"owner\":\"propctl\","
                                 "\"state\":\"Completed\"");
    /* A stray end for a slot that is not running is ignored. */
    pb_task_finished(fake.core, 2, PB_RUN_OK, 0, 0, NULL);
    pb_task_finished(fake.core, 99, PB_RUN_OK, 0, 0, NULL);
    CHECK_INT(fake_count("/results/a") + fake_count("/results/b") + fake_count("/results/c") +
                  fake_count("/results/d"), 4);
}

static void unknown_wall_clock(void)
{
    setup(true);
    fake.wall = -1;
    struct task_def t = {"once", "o1", "\"function\":\"f\""};
    desire(1, &t, 1);
    serve();
    pb_task_finished(fake.core, fake.starts[0].slot, PB_RUN_OK, 1, 1, NULL);
    /* No started_at / finished_at in the state; the result has to carry them: 0.0. */
    CHECK_CONTAINS(fake_state(), "\"state\":\"Completed\",\"restarts\":0,\"runs\":1,\"result\":\"1\"}");
    CHECK_CONTAINS(result_of("once"), "\"started_at\":0.0,\"finished_at\":0.0,");
}

static void results_published_again_on_reconnect(void)
{
    setup(true);
    struct task_def t = {"svc", "s1", "\"function\":\"run\",\"daemon\":true"};
    desire(1, &t, 1);
    serve();
    pb_on_disconnect(fake.core);
    fake.wall += 250;
    pb_task_finished(fake.core, fake.starts[0].slot, PB_RUN_TRAP, 0, 0, "trap: unreachable");
    CHECK_INT(fake_count("/results/svc"), 0); /* nothing goes out while the session is down */
    fake.now += 1000;
    pb_tick(fake.core, fake.now); /* the daemon restarts meanwhile */
    CHECK_INT(pb_running(fake.core), 1);
    fake_clear_msgs();
    fake_connect();
    CHECK_STR(result_of("svc"),
              "{\"proplet\":\"board-7\",\"task\":\"svc\",\"spec_hash\":\"s1\",\"state\":"
              "\"Failed\",\"runs\":1,\"started_at\":1796416659.0,\"finished_at\":1796416659.25,"
              "\"stdout\":\"\",\"stderr\":\"\",\"truncated\":false,\"error\":\"trap: unreachable\"}");
    CHECK_CONTAINS(fake_state(), "\"state\":\"Running\",\"restarts\":1,\"runs\":2,");
}

static void identity_checked(void)
{
    fake_reset(true);
    struct pb_identity bad = {.proplet_id = "bad id"};
    CHECK(fake_core_with(&bad) == NULL);
    bad.proplet_id = "-lead";
    CHECK(fake_core_with(&bad) == NULL);
    bad.proplet_id = "ok";
    bad.domain = "";
    CHECK(fake_core_with(&bad) == NULL);
    bad.domain = "d";
    bad.channel = "c";
    CHECK(fake_core_with(&bad) != NULL);
    static uint64_t small[16];
    CHECK(pb_init(small, sizeof small, &fake.platform, &bad) == NULL);
    CHECK(pb_init((uint8_t *)small + 1, PB_ARENA_BYTES, &fake.platform, &bad) == NULL);
    CHECK(pb_arena_size() <= PB_ARENA_BYTES);
    struct pb_platform none = {0};
    CHECK(pb_init(small, sizeof small, &none, &bad) == NULL);
}

void suite_converge(void)
{
    RUN(connect_sequence);
    RUN(start_and_report);
    RUN(stop_removed_and_clear_result);
    RUN(restart_on_spec_change);
    RUN(once_per_spec_across_reboots);
    RUN(interrupted_run_restarts);
    RUN(generation_ordering);
    RUN(excess_tasks_reported_pending);
    RUN(tasks_beyond_the_overflow_list_are_counted);
    RUN(slots_are_shared);
    RUN(daemon_backoff);
    RUN(timeout_stops_a_spinning_task);
    RUN(start_failures_and_synchronous_runs);
    RUN(unknown_wall_clock);
    RUN(results_published_again_on_reconnect);
    RUN(identity_checked);
}
