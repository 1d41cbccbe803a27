/* The core's Wasm runtime on WAMR: one worker thread per task slot.
 *
 * wasm_start hands a job to the slot's worker and returns at once; the worker loads its own
 * copy of the module, instantiates it with the task's memory cap, calls the exported function
 * (after _initialize, when the module is a reactor) and posts the outcome to a message queue.
 * The main loop drains that queue and tells the core (wasm_glue_drain), so the core is only
 * ever called from the main loop's thread.
 *
 * wasm_stop raises the slot's stop flag and terminates the running instance; the host function
 * sleep_ms watches the same flag, so a sleeping task stops within one sleep step. The end of a
 * stopped run is reported like any other (PB_RUN_STOPPED).
 *
 * Host functions, imported from module "propeller":
 *   log(ptr: i32, len: i32)   one line of UTF-8 from linear memory to the board's log
 *   now_ms() -> i64           monotonic milliseconds since boot
 *   sleep_ms(ms: i32)         sleep, cut short when the task is stopped
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <zephyr/kernel.h>
#include <zephyr/logging/log.h>
#include <zephyr/sys/atomic.h>
#include <zephyr/sys/util.h>

#include "glue.h"
#include "propeller/core.h"
#include "wasm_export.h"

LOG_MODULE_REGISTER(pb_wasm, CONFIG_PROPELLER_LOG_LEVEL);

#define WASM_PAGE_BYTES 65536u
#define SLEEP_STEP_MS 10
#define LOG_LINE_MAX 256
#define EXCEPTION_PREFIX "Exception: "

struct run_report {
    int slot;
    int status; /* enum pb_run_status */
    int nresults;
    int64_t result;
    char error[PB_ERROR_LEN];
};

struct slot {
    struct k_thread thread;
    struct k_sem go;
    /* Guards `inst` so that a stop never terminates an instance being torn down. */
    struct k_mutex lock;
    wasm_module_inst_t inst;
    atomic_t stop;
    bool busy; /* main loop only: from a successful start until its report is drained */
    int index;

    /* The job, written by the main loop before `go` is given. */
    const uint8_t *module;
    size_t module_len;
    char function[PB_FUNCTION_LEN + 1];
    int argc;
    int64_t args[PB_ARGS_MAX];
    struct pb_limits limits;
};

static struct slot slots[PB_MAX_TASKS];
static bool runtime_ready;

K_THREAD_STACK_ARRAY_DEFINE(worker_stacks, PB_MAX_TASKS, CONFIG_PROPELLER_WORKER_STACK_SIZE);
/* Each slot has at most one report outstanding, so the queue never fills. */
K_MSGQ_DEFINE(finished_q, sizeof(struct run_report), PB_MAX_TASKS, 8);

static uint8_t wamr_pool[CONFIG_PROPELLER_WAMR_POOL_SIZE] __aligned(8);

/* ---- host functions ------------------------------------------------------------------- */

static struct slot *slot_of(wasm_exec_env_t exec_env)
{
    wasm_module_inst_t inst = wasm_runtime_get_module_inst(exec_env);

    return inst != NULL ? wasm_runtime_get_custom_data(inst) : NULL;
}

static void host_log(wasm_exec_env_t exec_env, int32_t ptr, int32_t len)
{
    wasm_module_inst_t inst = wasm_runtime_get_module_inst(exec_env);
    struct slot *s = slot_of(exec_env);
    char line[LOG_LINE_MAX + 1];

    if (len < 0) {
        wasm_runtime_set_exception(inst, "log: negative length");
        return;
    }
    /* An address outside linear memory raises an exception, which ends the run as a trap. */
    if (!wasm_runtime_validate_app_addr(inst, (uint32_t)ptr, (uint32_t)len)) {
        return;
    }
    const char *text = wasm_runtime_addr_app_to_native(inst, (uint32_t)ptr);
    size_t n = MIN((size_t)len, sizeof(line) - 1);

    memcpy(line, text, n);
    line[n] = '\0';
    LOG_INF("task %d: %s%s", s != NULL ? s->index : -1, line, (size_t)len > n ? "..." : "");
}

static int64_t host_now_ms(wasm_exec_env_t exec_env)
{
    ARG_UNUSED(exec_env);
    return k_uptime_get();
}

static void host_sleep_ms(wasm_exec_env_t exec_env, int32_t ms)
{
    struct slot *s = slot_of(exec_env);
    int64_t until = k_uptime_get() + (ms > 0 ? ms : 0);

    for (;;) {
        if (s != NULL && atomic_get(&s->stop)) {
            return;
        }
        int64_t left = until - k_uptime_get();

        if (left <= 0) {
            return;
        }
        k_msleep((int32_t)MIN(left, SLEEP_STEP_MS));
    }
}

/* WAMR sorts this table in place and keeps it: it must be writable and live forever. */
static NativeSymbol host_functions[] = {
    {"log", (void *)host_log, "(ii)", NULL},
    {"now_ms", (void *)host_now_ms, "()I", NULL},
    {"sleep_ms", (void *)host_sleep_ms, "(i)", NULL},
};

/* ---- one run -------------------------------------------------------------------------- */

static void __attribute__((format(printf, 2, 3)))
report_error(struct run_report *r, const char *fmt, ...)
{
    va_list ap;

    r->status = PB_RUN_TRAP;
    va_start(ap, fmt);
    vsnprintf(r->error, sizeof(r->error), fmt, ap);
    va_end(ap);
}

static void report_exception(struct slot *s, wasm_module_inst_t inst, struct run_report *r)
{
    const char *exc = wasm_runtime_get_exception(inst);

    if (atomic_get(&s->stop)) {
        r->status = PB_RUN_STOPPED;
        return;
    }
    if (exc == NULL) {
        report_error(r, "the call failed without an exception");
        return;
    }
    if (strncmp(exc, EXCEPTION_PREFIX, strlen(EXCEPTION_PREFIX)) == 0) {
        exc += strlen(EXCEPTION_PREFIX);
    }
    if (strstr(exc, "instruction limit") != NULL) {
        report_error(r, "out of fuel");
        return;
    }
    report_error(r, "%s", exc);
}

/* Checks the exported function's type against the call and fills the arguments. */
static int prepare_call(struct slot *s, wasm_function_inst_t func, wasm_module_inst_t inst,
                        wasm_val_t *vals, uint32_t *nresults, struct run_report *r)
{
    wasm_valkind_t types[PB_ARGS_MAX];
    uint32_t nparams = wasm_func_get_param_count(func, inst);

    if (nparams != (uint32_t)s->argc) {
        report_error(r, "\"%s\" takes %u arguments, the task gives %d", s->function,
                     (unsigned)nparams, s->argc);
        return -EINVAL;
    }
    if (nparams > 0) {
        wasm_func_get_param_types(func, inst, types);
    }
    for (uint32_t i = 0; i < nparams; i++) {
        vals[i].kind = types[i];
        if (types[i] == WASM_I64) {
            vals[i].of.i64 = s->args[i];
        } else if (types[i] != WASM_I32) {
            report_error(r, "parameter %u of \"%s\" is not an integer; boards pass i32 and i64",
                         (unsigned)i, s->function);
            return -EINVAL;
        } else if (s->args[i] < INT32_MIN || s->args[i] > INT32_MAX) {
            report_error(r, "argument %u does not fit the i32 parameter of \"%s\"", (unsigned)i,
                         s->function);
            return -ERANGE;
        } else {
            vals[i].of.i32 = (int32_t)s->args[i];
        }
    }

    *nresults = wasm_func_get_result_count(func, inst);
    if (*nresults > 1) {
        report_error(r, "\"%s\" returns %u values; boards report one", s->function,
                     (unsigned)*nresults);
        return -EINVAL;
    }
    if (*nresults == 1) {
        wasm_valkind_t rtype;

        wasm_func_get_result_types(func, inst, &rtype);
        if (rtype != WASM_I32 && rtype != WASM_I64) {
            report_error(r, "the result of \"%s\" is not an integer", s->function);
            return -EINVAL;
        }
    }
    return 0;
}

static void run(struct slot *s, struct run_report *r)
{
    char err[128] = "";
    uint8_t *copy = NULL;
    wasm_module_t module = NULL;
    wasm_module_inst_t inst = NULL;
    wasm_exec_env_t exec_env = NULL;
    wasm_function_inst_t func;
    wasm_val_t vals[PB_ARGS_MAX];
    wasm_val_t results[1];
    uint32_t nresults = 0;
    uint32_t max_pages = 0;

    if (atomic_get(&s->stop)) {
        r->status = PB_RUN_STOPPED;
        return;
    }
    if (s->limits.memory > 0) {
        uint64_t pages = s->limits.memory / WASM_PAGE_BYTES;

        if (pages == 0) {
            report_error(r, "a memory limit of %llu bytes is below one Wasm page (65536 bytes)",
                         (unsigned long long)s->limits.memory);
            return;
        }
        max_pages = (uint32_t)MIN(pages, (uint64_t)UINT32_MAX);
    }

    /* WAMR may rewrite the bytes it loads, while the core's module buffer is shared between
     * tasks and must stay intact: each run loads its own copy. */
    copy = wasm_runtime_malloc((uint32_t)s->module_len);
    if (copy == NULL) {
        report_error(r, "not enough runtime memory for a copy of the module (%u bytes)",
                     (unsigned)s->module_len);
        goto out;
    }
    memcpy(copy, s->module, s->module_len);

    module = wasm_runtime_load(copy, (uint32_t)s->module_len, err, sizeof(err));
    if (module == NULL) {
        report_error(r, "module does not load: %s", err);
        goto out;
    }

    InstantiationArgs inst_args = {
        .default_stack_size = CONFIG_PROPELLER_WASM_STACK_SIZE,
        .host_managed_heap_size = CONFIG_PROPELLER_WASM_HEAP_SIZE,
        .max_memory_pages = max_pages,
    };

    inst = wasm_runtime_instantiate_ex(module, &inst_args, err, sizeof(err));
    if (inst == NULL && s->limits.memory > 0 && strstr(err, "memory") != NULL) {
        report_error(r, "memory limit of %llu bytes reached: %s",
                     (unsigned long long)s->limits.memory, err);
        goto out;
    }
    if (inst == NULL) {
        report_error(r, "module does not instantiate: %s", err);
        goto out;
    }
    wasm_runtime_set_custom_data(inst, s);

    func = wasm_runtime_lookup_function(inst, s->function);
    if (func == NULL) {
        report_error(r, "the module exports no function \"%s\"", s->function);
        goto out;
    }
    if (prepare_call(s, func, inst, vals, &nresults, r) != 0) {
        goto out;
    }
    exec_env = wasm_runtime_create_exec_env(inst, CONFIG_PROPELLER_WASM_STACK_SIZE);
    if (exec_env == NULL) {
        report_error(r, "not enough runtime memory for a Wasm stack of %u bytes",
                     (unsigned)CONFIG_PROPELLER_WASM_STACK_SIZE);
        goto out;
    }
#if defined(CONFIG_PROPELLER_FUEL)
    if (s->limits.fuel > 0) {
        wasm_runtime_set_instruction_count_limit(exec_env,
                                                 (int)MIN(s->limits.fuel, (int64_t)INT_MAX));
    }
#endif

    /* From here a stop terminates the instance; before, the flag alone ends the run. */
    k_mutex_lock(&s->lock, K_FOREVER);
    if (atomic_get(&s->stop)) {
        k_mutex_unlock(&s->lock);
        r->status = PB_RUN_STOPPED;
        goto out;
    }
    s->inst = inst;
    k_mutex_unlock(&s->lock);

    /* A reactor module (clang -mexec-model=reactor) expects _initialize once, first. */
    wasm_function_inst_t init = wasm_runtime_lookup_function(inst, "_initialize");
    bool ok = true;

    if (init != NULL && init != func) {
        ok = wasm_runtime_call_wasm_a(exec_env, init, 0, NULL, 0, NULL);
    }
    if (ok) {
        ok = wasm_runtime_call_wasm_a(exec_env, func, nresults, results, (uint32_t)s->argc,
                                      vals);
    }

    k_mutex_lock(&s->lock, K_FOREVER);
    s->inst = NULL;
    k_mutex_unlock(&s->lock);

    if (ok) {
        r->status = PB_RUN_OK;
        r->nresults = (int)nresults;
        if (nresults == 1) {
            r->result = results[0].kind == WASM_I64 ? results[0].of.i64
                                                    : (int64_t)results[0].of.i32;
        }
    } else {
        report_exception(s, inst, r);
    }

out:
    if (exec_env != NULL) {
        wasm_runtime_destroy_exec_env(exec_env);
    }
    if (inst != NULL) {
        wasm_runtime_deinstantiate(inst);
    }
    if (module != NULL) {
        wasm_runtime_unload(module);
    }
    if (copy != NULL) {
        wasm_runtime_free(copy);
    }
}

static void worker_main(void *p1, void *p2, void *p3)
{
    struct slot *s = p1;
    bool thread_env = wasm_runtime_init_thread_env();

    ARG_UNUSED(p2);
    ARG_UNUSED(p3);
    if (!thread_env) {
        LOG_ERR("slot %d: WAMR thread environment failed", s->index);
    }
    for (;;) {
        struct run_report r = {.slot = s->index, .status = PB_RUN_TRAP};

        k_sem_take(&s->go, K_FOREVER);
        if (thread_env) {
            run(s, &r);
        } else {
            report_error(&r, "the runtime could not set up the thread of slot %d", s->index);
        }
        k_msgq_put(&finished_q, &r, K_FOREVER);
    }
}

/* ---- the platform interface ----------------------------------------------------------- */

int wasm_glue_init(void)
{
    RuntimeInitArgs init_args;

    memset(&init_args, 0, sizeof(init_args));
    init_args.mem_alloc_type = Alloc_With_Pool;
    init_args.mem_alloc_option.pool.heap_buf = wamr_pool;
    init_args.mem_alloc_option.pool.heap_size = sizeof(wamr_pool);
    /* The thread manager splits a module's shadow stack between its main call and this many
     * extra threads; the board starts none, and 1 is the smallest value WAMR takes. */
    init_args.max_thread_num = 1;

    if (!wasm_runtime_full_init(&init_args)) {
        LOG_ERR("WAMR did not initialise (pool of %u bytes)", (unsigned)sizeof(wamr_pool));
        return -ENOMEM;
    }
    /* Once, before any module is loaded: imports resolve at load time. */
    if (!wasm_runtime_register_natives("propeller", host_functions,
                                       ARRAY_SIZE(host_functions))) {
        LOG_ERR("WAMR refused the host functions");
        return -EINVAL;
    }

    for (int i = 0; i < PB_MAX_TASKS; i++) {
        struct slot *s = &slots[i];
        char name[16];

        s->index = i;
        k_sem_init(&s->go, 0, 1);
        k_mutex_init(&s->lock);
        atomic_clear(&s->stop);
        k_thread_create(&s->thread, worker_stacks[i], K_THREAD_STACK_SIZEOF(worker_stacks[i]),
                        worker_main, s, NULL, NULL,
                        K_PRIO_PREEMPT(CONFIG_PROPELLER_WORKER_PRIORITY), 0, K_NO_WAIT);
        snprintf(name, sizeof(name), "pb_task%d", i);
        k_thread_name_set(&s->thread, name);
    }
    runtime_ready = true;
    LOG_INF("WAMR ready: %d task slots, pool %u bytes", PB_MAX_TASKS,
            (unsigned)sizeof(wamr_pool));
    return 0;
}

int wasm_glue_start(void *ctx, int slot, const uint8_t *module, size_t len, const char *function,
                    int argc, const int64_t *args, const struct pb_limits *limits)
{
    ARG_UNUSED(ctx);
    if (!runtime_ready) {
        return -ENODEV;
    }
    if (slot < 0 || slot >= PB_MAX_TASKS || module == NULL || function == NULL) {
        return -EINVAL;
    }
    struct slot *s = &slots[slot];

    if (s->busy) {
        return -EBUSY;
    }
    if (argc < 0 || argc > PB_ARGS_MAX || (argc > 0 && args == NULL)) {
        return -E2BIG;
    }
    if (len == 0 || len > UINT32_MAX) {
        return -EFBIG;
    }
    size_t function_len = strlen(function);

    if (function_len > PB_FUNCTION_LEN) {
        return -ENAMETOOLONG;
    }
#if !defined(CONFIG_PROPELLER_FUEL)
    if (limits != NULL && limits->fuel > 0) {
        return -ENOTSUP;
    }
#endif

    s->module = module;
    s->module_len = len;
    memcpy(s->function, function, function_len + 1);
    s->argc = argc;
    if (argc > 0) {
        memcpy(s->args, args, (size_t)argc * sizeof(args[0]));
    }
    if (limits != NULL) {
        s->limits = *limits;
    } else {
        memset(&s->limits, 0, sizeof(s->limits));
    }
    atomic_clear(&s->stop);
    s->busy = true;
    k_sem_give(&s->go);
    return 0;
}

void wasm_glue_stop(void *ctx, int slot)
{
    ARG_UNUSED(ctx);
    if (slot < 0 || slot >= PB_MAX_TASKS || !slots[slot].busy) {
        return;
    }
    struct slot *s = &slots[slot];

    atomic_set(&s->stop, 1);
    k_mutex_lock(&s->lock, K_FOREVER);
    if (s->inst != NULL) {
        wasm_runtime_terminate(s->inst);
    }
    k_mutex_unlock(&s->lock);
}

void wasm_glue_drain(pb_core *core)
{
    struct run_report r;

    while (k_msgq_get(&finished_q, &r, K_NO_WAIT) == 0) {
        /* Free the slot first: the core may start the next run from inside the call. */
        slots[r.slot].busy = false;
        pb_task_finished(core, r.slot, r.status, r.nresults, r.result,
                         r.error[0] != '\0' ? r.error : NULL);
    }
}
