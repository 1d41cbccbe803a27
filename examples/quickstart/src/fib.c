/* A function task: the n-th Fibonacci number as a 64-bit integer (exact up to n = 92).
 * Built as a WASI reactor; the proplet calls the exported `fib` with the task's args. */
#include <stdint.h>

__attribute__((export_name("fib")))
int64_t fib(int32_t n) {
    int64_t a = 0, b = 1;
    for (int32_t i = 0; i < n; i++) {
        int64_t next = a + b;
        a = b;
        b = next;
    }
    return a;
}
