/* A function task: count the primes below `limit` with a sieve of Eratosthenes.
 * Built as a WASI reactor; the proplet calls the exported `count_primes` with the task's args. */
#include <stdint.h>
#include <stdlib.h>

__attribute__((export_name("count_primes")))
int32_t count_primes(int32_t limit) {
    if (limit < 3) {
        return 0;
    }
    uint8_t *composite = calloc((size_t)limit, 1);
    if (composite == NULL) {
        return -1;
    }
    int32_t count = 0;
    for (int32_t i = 2; i < limit; i++) {
        if (composite[i]) {
            continue;
        }
        count++;
        for (int64_t j = (int64_t)i * i; j < limit; j += i) {
            composite[j] = 1;
        }
    }
    free(composite);
    return count;
}
