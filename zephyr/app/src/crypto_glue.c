/* sha256 for the core's digest checks, through PSA Crypto (Mbed TLS, or a hardware driver
 * behind it). Without CONFIG_PROPELLER_PSA_SHA256 the platform leaves the seam empty and the
 * core uses its own software implementation. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include <zephyr/kernel.h>
#include <zephyr/logging/log.h>

#include "glue.h"

LOG_MODULE_REGISTER(pb_crypto, CONFIG_PROPELLER_LOG_LEVEL);

#if defined(CONFIG_PROPELLER_PSA_SHA256)
#include <psa/crypto.h>

int crypto_glue_init(void)
{
    psa_status_t st = psa_crypto_init();

    if (st != PSA_SUCCESS) {
        LOG_ERR("psa_crypto_init failed (%d)", (int)st);
        return -EIO;
    }
    return 0;
}

int crypto_glue_sha256(void *ctx, const uint8_t *data, size_t len, uint8_t out[32])
{
    psa_hash_operation_t op = PSA_HASH_OPERATION_INIT;
    size_t out_len = 0;
    psa_status_t st;

    ARG_UNUSED(ctx);
    st = psa_hash_setup(&op, PSA_ALG_SHA_256);
    if (st == PSA_SUCCESS) {
        st = psa_hash_update(&op, data, len);
    }
    if (st == PSA_SUCCESS) {
        st = psa_hash_finish(&op, out, 32, &out_len);
    }
    if (st != PSA_SUCCESS || out_len != 32) {
        psa_hash_abort(&op);
        return -EIO;
    }
    return 0;
}

#else

int crypto_glue_init(void)
{
    return -ENOTSUP;
}

int crypto_glue_sha256(void *ctx, const uint8_t *data, size_t len, uint8_t out[32])
{
    ARG_UNUSED(ctx);
    ARG_UNUSED(data);
    ARG_UNUSED(len);
    ARG_UNUSED(out);
    return -ENOTSUP;
}

#endif
