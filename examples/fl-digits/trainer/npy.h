/* Reading and writing NumPy .npy files (format versions 1.0 and 2.0), for the few dtypes the
 * trainer uses. Only little-endian, C-order arrays are accepted; everything else is refused with
 * a message rather than guessed at. */
#ifndef NPY_H
#define NPY_H

#include <stddef.h>
#include <stdint.h>

#define NPY_MAX_DIMS 8

/* Return codes: the trainer's exit codes for the same failures. */
#define NPY_OK 0
#define NPY_EIO 1     /* the file cannot be opened, read or written */
#define NPY_EFORMAT 2 /* not a .npy file, or not one the trainer accepts */

typedef enum { NPY_F4, NPY_I4, NPY_I8 } npy_dtype;

typedef struct {
    npy_dtype dtype;
    int ndim;
    uint64_t shape[NPY_MAX_DIMS];
    uint64_t count; /* the product of shape: 1 for a 0-d array */
    void *data;     /* count items of dtype, owned; aligned for the dtype */
} npy_array;

/* Reads `path` into `out`. On failure returns NPY_EIO or NPY_EFORMAT and puts a message (without
 * the path) into `err`. */
int npy_read(const char *path, npy_array *out, char *err, size_t errlen);

/* Writes a version 1.0 '<f4' C-order file with the given shape. */
int npy_write_f4(const char *path, const float *data, int ndim, const uint64_t *shape, char *err,
                 size_t errlen);

void npy_free(npy_array *array);

const char *npy_dtype_name(npy_dtype dtype);

#endif
