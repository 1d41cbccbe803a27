/* The glue's functions, as main.c calls them and each glue file defines them: one place for
 * their declarations. Needs no Zephyr header: MQTT types are only pointed to. */
#ifndef PROPELLER_APP_GLUE_H
#define PROPELLER_APP_GLUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "propeller/core.h"

struct mqtt_client;
struct mqtt_evt;

/* mqtt_glue.c: Zephyr's MQTT client <-> the core */
void mqtt_glue_bind(struct mqtt_client *client, pb_core *core);
int mqtt_glue_connack(void);
bool mqtt_glue_up(void);
int mqtt_glue_fd(const struct mqtt_client *client);
void mqtt_glue_event(struct mqtt_client *client, const struct mqtt_evt *evt);
int mqtt_glue_publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos,
                      bool retain);
int mqtt_glue_subscribe(void *ctx, const char *filter, int qos);

/* wasm_glue.c: WAMR, one worker thread per task slot */
int wasm_glue_init(void);
int wasm_glue_start(void *ctx, int slot, const uint8_t *module, size_t len, const char *function,
                    int argc, const int64_t *args, const struct pb_limits *limits);
void wasm_glue_stop(void *ctx, int slot);
void wasm_glue_drain(pb_core *core);

/* kv_glue.c: the settings subsystem (NVS) as the core's key-value store */
int kv_glue_init(void);
int kv_glue_get(void *ctx, const char *key, void *buf, size_t len);
int kv_glue_set(void *ctx, const char *key, const void *buf, size_t len);
int kv_glue_config(const char *key, char *out, size_t cap);

/* crypto_glue.c: PSA Crypto sha256 behind the core's sha256 seam */
int crypto_glue_init(void);
int crypto_glue_sha256(void *ctx, const uint8_t *data, size_t len, uint8_t out[32]);

#endif
