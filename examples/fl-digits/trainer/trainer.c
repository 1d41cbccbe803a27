/* The fl-digits trainer: one client's part of a federated-learning round, as a WASI command.
 *
 * It reads the global model from /in/model.npy and the proplet's local data from
 * /data/$FL_DATASET/{x,y}.npy. In train mode (the default) it runs $FL_EPOCHS epochs of minibatch
 * SGD of softmax regression from the global model, writes the local model to /out/update.npy and
 * prints {"samples": N, "loss": L}. In evaluate mode it prints {"samples": N, "loss": L,
 * "accuracy": A} and writes nothing. The JSON line is the only output on stdout; errors go to
 * stderr with exit code 1 (a file cannot be read or written), 2 (invalid input: a malformed file,
 * mismatched shapes, a bad setting) or 3 (training diverged).
 *
 * The model is d * C float32 weights, row-major [feature][class], then C biases; C follows from
 * the model's size and the data's width d. Its shape in the file is free (650 or 65x10 for the
 * digits) and is kept in the update. Weights stay float32 between SGD steps; logits, softmax,
 * gradients and the update are computed in double, and each updated weight is rounded to float32.
 * reference.py performs the same operations in the same order with numpy. */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "npy.h"

#define EXIT_IO 1
#define EXIT_INVALID 2
#define EXIT_DIVERGED 3

#define MODEL_PATH "/in/model.npy"
#define UPDATE_PATH "/out/update.npy"
#define DATA_ROOT "/data"

static const uint64_t GAMMA = 0x9E3779B97F4A7C15ull;

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

static void die(int code, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fputs("trainer: ", stderr);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    va_end(args);
    exit(code);
}

/* --- settings from the environment ---------------------------------------------------------- */

typedef struct {
    int evaluate;
    const char *dataset;
    uint64_t round, seed;
    long epochs, batch;
    double lr;
} settings;

static const char *setting(const char *name) {
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

/* A decimal integer; a leading '-' wraps modulo 2^64 (used for seeds). */
static int parse_u64(const char *s, uint64_t *out) {
    int negative = *s == '-';
    s += negative;
    if (!*s)
        return 0;
    uint64_t v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return 0;
        unsigned digit = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - digit) / 10)
            return 0;
        v = v * 10 + digit;
    }
    if (negative && v > (uint64_t)1 << 63)
        return 0;
    *out = negative ? (uint64_t)0 - v : v;
    return 1;
}

static long positive(const char *name, long fallback, long max) {
    const char *v = setting(name);
    uint64_t n;
    if (!v)
        return fallback;
    if (*v == '-' || !parse_u64(v, &n) || n < 1 || n > (uint64_t)max)
        die(EXIT_INVALID, "%s must be an integer from 1 to %ld, not '%s'", name, max, v);
    return (long)n;
}

static settings read_settings(void) {
    settings s = {0, "digits", 1, 0, 1, 10, 0.1};
    const char *v;
    if ((v = setting("FL_MODE")) && strcmp(v, "train") != 0) {
        if (strcmp(v, "evaluate") != 0)
            die(EXIT_INVALID, "FL_MODE must be 'train' or 'evaluate', not '%s'", v);
        s.evaluate = 1;
    }
    if ((v = setting("FL_MODEL")) && strcmp(v, "softmax") != 0)
        die(EXIT_INVALID, "FL_MODEL '%s' is not supported (this trainer has 'softmax')", v);
    if ((v = setting("FL_DATASET"))) {
        /* One path component under /data: no separators, no dot names. */
        if (v[0] == '.' || strspn(v, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                     "0123456789._-") != strlen(v))
            die(EXIT_INVALID, "FL_DATASET must be a plain directory name, not '%s'", v);
        s.dataset = v;
    }
    if (s.evaluate)
        return s;
    s.round = (uint64_t)positive("FL_ROUND", 1, 1000000000L);
    s.epochs = positive("FL_EPOCHS", 1, 100000L);
    s.batch = positive("FL_BATCH", 10, 1000000000L);
    if ((v = setting("FL_SEED")) && !parse_u64(v, &s.seed))
        die(EXIT_INVALID, "FL_SEED must be a 64-bit integer, not '%s'", v);
    if ((v = setting("FL_LR"))) {
        char *end;
        s.lr = strtod(v, &end);
        if (*end || end == v || !isfinite(s.lr) || s.lr <= 0)
            die(EXIT_INVALID, "FL_LR must be a positive number, not '%s'", v);
    }
    return s;
}

/* --- inputs --------------------------------------------------------------------------------- */

static void load(const char *path, npy_array *a) {
    char err[160];
    int rc = npy_read(path, a, err, sizeof err);
    if (rc != NPY_OK)
        die(rc, "%s: %s", path, err);
}

typedef struct {
    size_t n, d, classes;
    const float *x; /* n rows of d features */
    int32_t *y;     /* n labels in 0..classes-1 */
} dataset;

static dataset load_data(const char *name, const npy_array *model) {
    char xpath[96], ypath[96];
    snprintf(xpath, sizeof xpath, "%s/%s/x.npy", DATA_ROOT, name);
    snprintf(ypath, sizeof ypath, "%s/%s/y.npy", DATA_ROOT, name);
    npy_array x, y;
    load(xpath, &x);
    load(ypath, &y);
    if (x.dtype != NPY_F4 || x.ndim != 2 || x.shape[0] == 0 || x.shape[1] == 0)
        die(EXIT_INVALID, "%s: need a non-empty '<f4' array of shape (n, d)", xpath);
    if ((y.dtype != NPY_I8 && y.dtype != NPY_I4) || y.ndim != 1 || y.shape[0] != x.shape[0])
        die(EXIT_INVALID, "%s: need '<i8' or '<i4' labels of shape (%llu,)", ypath,
            (unsigned long long)x.shape[0]);
    dataset data = {x.shape[0], x.shape[1], 0, x.data, NULL};
    if (model->count % (data.d + 1) != 0 || model->count / (data.d + 1) < 2)
        die(EXIT_INVALID,
            "the model has %llu values, which does not fit %zu features: softmax regression needs "
            "(%zu + 1) * classes",
            (unsigned long long)model->count, data.d, data.d);
    data.classes = model->count / (data.d + 1);
    data.y = malloc(data.n * sizeof *data.y);
    if (!data.y)
        die(EXIT_IO, "out of memory");
    for (size_t i = 0; i < data.n; i++) {
        int64_t label = y.dtype == NPY_I8 ? ((const int64_t *)y.data)[i]
                                          : ((const int32_t *)y.data)[i];
        if (label < 0 || (uint64_t)label >= data.classes)
            die(EXIT_INVALID, "%s: label %lld of sample %zu is outside 0..%zu", ypath,
                (long long)label, i, data.classes - 1);
        data.y[i] = (int32_t)label;
    }
    npy_free(&y);
    return data;
}

/* --- the model ------------------------------------------------------------------------------ */

/* z = x W + b, summed over the features in order. */
static void logits(const float *w, size_t d, size_t classes, const float *x, double *z) {
    const float *bias = w + d * classes;
    for (size_t c = 0; c < classes; c++)
        z[c] = 0;
    for (size_t k = 0; k < d; k++) {
        double xk = x[k];
        const float *row = w + k * classes;
        for (size_t c = 0; c < classes; c++)
            z[c] += xk * (double)row[c];
    }
    for (size_t c = 0; c < classes; c++)
        z[c] += (double)bias[c];
}

static double max_of(const double *z, size_t classes) {
    double top = z[0];
    for (size_t c = 1; c < classes; c++)
        if (z[c] > top)
            top = z[c];
    return top;
}

/* p = softmax(z), with the max subtracted so exp never overflows. */
static void softmax(const double *z, size_t classes, double *p) {
    double top = max_of(z, classes), sum = 0;
    for (size_t c = 0; c < classes; c++) {
        p[c] = exp(z[c] - top);
        sum += p[c];
    }
    for (size_t c = 0; c < classes; c++)
        p[c] /= sum;
}

typedef struct {
    double loss, accuracy;
} evaluation;

/* Mean cross-entropy, log-sum-exp(z) - z[y], and the fraction whose first maximal logit is y. */
static evaluation evaluate(const float *w, const dataset *data, double *z) {
    double total = 0;
    size_t correct = 0;
    for (size_t i = 0; i < data->n; i++) {
        logits(w, data->d, data->classes, data->x + i * data->d, z);
        double top = max_of(z, data->classes), sum = 0;
        size_t best = 0;
        for (size_t c = 0; c < data->classes; c++) {
            sum += exp(z[c] - top);
            if (z[c] > z[best])
                best = c;
        }
        total += top + log(sum) - z[data->y[i]];
        correct += best == (size_t)data->y[i];
    }
    evaluation e = {total / (double)data->n, (double)correct / (double)data->n};
    return e;
}

/* --- shuffling: splitmix64 and Fisher-Yates ------------------------------------------------- */

static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Two splitmix64 steps fold the round and the epoch into the seed. */
static uint64_t stream_state(uint64_t seed, uint64_t round, uint64_t epoch) {
    uint64_t o1 = mix(seed + GAMMA);
    uint64_t o2 = mix((o1 ^ round) + GAMMA);
    return o2 ^ epoch;
}

/* For i = n-1 down to 1: j = next() mod (i + 1), swap items i and j. */
static void shuffle(uint32_t *order, size_t n, uint64_t state) {
    for (size_t i = 0; i < n; i++)
        order[i] = (uint32_t)i;
    for (size_t i = n - 1; i > 0; i--) {
        state += GAMMA;
        size_t j = (size_t)(mix(state) % (uint64_t)(i + 1));
        uint32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

/* --- training ------------------------------------------------------------------------------- */

static void train(float *w, const dataset *data, const settings *s, double *z) {
    size_t d = data->d, classes = data->classes, size = (d + 1) * classes;
    uint32_t *order = malloc(data->n * sizeof *order);
    double *grad = malloc(size * sizeof *grad);
    if (!order || !grad)
        die(EXIT_IO, "out of memory");
    double *grad_bias = grad + d * classes;
    for (long epoch = 0; epoch < s->epochs; epoch++) {
        shuffle(order, data->n, stream_state(s->seed, s->round, (uint64_t)epoch));
        for (size_t start = 0; start < data->n; start += (size_t)s->batch) {
            size_t end = start + (size_t)s->batch < data->n ? start + (size_t)s->batch : data->n;
            memset(grad, 0, size * sizeof *grad);
            for (size_t b = start; b < end; b++) {
                const float *x = data->x + (size_t)order[b] * d;
                logits(w, d, classes, x, z);
                softmax(z, classes, z + classes);
                double *delta = z + classes; /* dLoss/dz = p - onehot(y) */
                delta[data->y[order[b]]] -= 1.0;
                for (size_t k = 0; k < d; k++) {
                    double xk = x[k];
                    for (size_t c = 0; c < classes; c++)
                        grad[k * classes + c] += xk * delta[c];
                }
                for (size_t c = 0; c < classes; c++)
                    grad_bias[c] += delta[c];
            }
            double m = (double)(end - start);
            for (size_t j = 0; j < size; j++)
                w[j] = (float)((double)w[j] - s->lr * (grad[j] / m));
        }
    }
    free(order);
    free(grad);
}

int main(void) {
    settings s = read_settings();
    npy_array model;
    load(MODEL_PATH, &model);
    if (model.dtype != NPY_F4)
        die(EXIT_INVALID, "%s: the model must be '<f4', not '%s'", MODEL_PATH,
            npy_dtype_name(model.dtype));
    float *w = model.data;
    for (uint64_t j = 0; j < model.count; j++)
        if (!isfinite(w[j]))
            die(EXIT_INVALID, "%s: value %llu is not finite", MODEL_PATH, (unsigned long long)j);
    dataset data = load_data(s.dataset, &model);
    double *z = malloc(2 * data.classes * sizeof *z); /* logits, then probabilities */
    if (!z)
        die(EXIT_IO, "out of memory");

    if (s.evaluate) {
        evaluation e = evaluate(w, &data, z);
        printf("{\"samples\": %zu, \"loss\": %.17g, \"accuracy\": %.17g}\n", data.n, e.loss,
               e.accuracy);
        return 0;
    }
    train(w, &data, &s, z);
    for (uint64_t j = 0; j < model.count; j++)
        if (!isfinite(w[j]))
            die(EXIT_DIVERGED, "training diverged (non-finite weights); lower FL_LR");
    evaluation e = evaluate(w, &data, z);
    if (!isfinite(e.loss))
        die(EXIT_DIVERGED, "training diverged (non-finite loss); lower FL_LR");
    char err[160];
    int rc = npy_write_f4(UPDATE_PATH, w, model.ndim, model.shape, err, sizeof err);
    if (rc != NPY_OK)
        die(rc, "%s: %s", UPDATE_PATH, err);
    printf("{\"samples\": %zu, \"loss\": %.17g}\n", data.n, e.loss);
    return 0;
}
