/* The core's MQTT transport on Zephyr's MQTT client.
 *
 * An incoming PUBLISH is streamed into the core: the header arrives with MQTT_EVT_PUBLISH, and
 * the payload is read from the socket slice by slice (CONFIG_PROPELLER_MQTT_SLICE bytes at a
 * time) and fed to pb_message_data until every announced byte has been read. Payloads are
 * never cut at a buffer size and never left unread: a desired set or a module chunk of any
 * length reaches the core whole, and the next packet starts where it should. A QoS 1 message
 * is acknowledged once drained.
 *
 * Everything here runs on the main loop's thread, inside mqtt_input().
 */
#include <errno.h>
#include <string.h>

#include <zephyr/kernel.h>
#include <zephyr/logging/log.h>
#include <zephyr/net/mqtt.h>
#include <zephyr/net/socket.h>

#include "glue.h"
#include "propeller/core.h"

LOG_MODULE_REGISTER(pb_mqtt, CONFIG_PROPELLER_LOG_LEVEL);

BUILD_ASSERT(CONFIG_PROPELLER_MQTT_TX_BUF >= PB_OUT_MAX + PB_TOPIC_MAX + 16,
             "the MQTT transmit buffer must hold the core's largest message");
BUILD_ASSERT(CONFIG_PROPELLER_MQTT_RX_BUF >= PB_TOPIC_MAX + 16,
             "the MQTT receive buffer must hold a PUBLISH header with the longest topic");

static struct mqtt_client *bound_client;
static pb_core *bound_core;
/* -EINPROGRESS until the CONNACK; then 0 (accepted), a positive CONNACK return code, or a
 * negative errno. */
static int connack = -EINPROGRESS;
static bool session_up;
static uint16_t last_message_id;

static char topic_buf[PB_TOPIC_MAX];
static uint8_t slice[CONFIG_PROPELLER_MQTT_SLICE];

void mqtt_glue_bind(struct mqtt_client *client, pb_core *core)
{
    bound_client = client;
    bound_core = core;
    connack = -EINPROGRESS;
    session_up = false;
}

int mqtt_glue_connack(void)
{
    return connack;
}

bool mqtt_glue_up(void)
{
    return session_up;
}

int mqtt_glue_fd(const struct mqtt_client *client)
{
#if defined(CONFIG_MQTT_LIB_TLS)
    if (client->transport.type == MQTT_TRANSPORT_SECURE) {
        return client->transport.tls.sock;
    }
#endif
    return client->transport.tcp.sock;
}

static uint16_t next_message_id(void)
{
    last_message_id++;
    if (last_message_id == 0) {
        last_message_id = 1;
    }
    return last_message_id;
}

/* Waits until the socket has bytes, for at most the payload timeout. */
static int wait_readable(struct mqtt_client *client)
{
    struct zsock_pollfd pfd = {.fd = mqtt_glue_fd(client), .events = ZSOCK_POLLIN};
    int rc = zsock_poll(&pfd, 1, CONFIG_PROPELLER_PAYLOAD_TIMEOUT_MS);

    if (rc < 0) {
        return -errno;
    }
    return rc == 0 ? -ETIMEDOUT : 0;
}

/* Reads the whole payload of the current PUBLISH; feeds it to the core when `feed`. */
static int drain_payload(struct mqtt_client *client, size_t total, bool feed)
{
    size_t left = total;

    while (left > 0) {
        int n = mqtt_read_publish_payload(client, slice, MIN(left, sizeof(slice)));

        if (n == -EAGAIN) {
            int rc = wait_readable(client);

            if (rc != 0) {
                return rc;
            }
            continue;
        }
        if (n < 0) {
            return n;
        }
        if (n == 0) {
            return -ECONNRESET;
        }
        if (feed) {
            pb_message_data(bound_core, slice, (size_t)n);
        }
        left -= (size_t)n;
    }
    return 0;
}

static void on_publish(struct mqtt_client *client, const struct mqtt_publish_param *p)
{
    size_t total = p->message.payload.len;
    size_t topic_len = p->message.topic.topic.size;
    bool feed = bound_core != NULL && topic_len < sizeof(topic_buf);

    if (feed) {
        memcpy(topic_buf, p->message.topic.topic.utf8, topic_len);
        topic_buf[topic_len] = '\0';
        pb_message_begin(bound_core, topic_buf, total);
    } else {
        LOG_WRN("topic of %u bytes is longer than %u: payload skipped", (unsigned)topic_len,
                (unsigned)(sizeof(topic_buf) - 1));
    }

    int rc = drain_payload(client, total, feed);

    if (feed) {
        /* A payload cut short by a broken connection ends shorter than announced, and the core
         * drops it. */
        (void)pb_message_end(bound_core);
    }
    if (rc != 0) {
        /* The connection is unusable: the main loop aborts it and starts a new session. */
        LOG_ERR("payload of %u bytes on %s cut off (%d)", (unsigned)total,
                feed ? topic_buf : "(long topic)", rc);
        session_up = false;
        return;
    }

    if (p->message.topic.qos == MQTT_QOS_1_AT_LEAST_ONCE) {
        struct mqtt_puback_param ack = {.message_id = p->message_id};

        rc = mqtt_publish_qos1_ack(client, &ack);
    } else if (p->message.topic.qos == MQTT_QOS_2_EXACTLY_ONCE) {
        struct mqtt_pubrec_param rec = {.message_id = p->message_id};

        rc = mqtt_publish_qos2_receive(client, &rec);
    }
    if (rc != 0) {
        LOG_WRN("acknowledging message %u failed (%d)", p->message_id, rc);
    }
}

void mqtt_glue_event(struct mqtt_client *client, const struct mqtt_evt *evt)
{
    switch (evt->type) {
    case MQTT_EVT_CONNACK:
        if (evt->result != 0) {
            connack = evt->result;
        } else {
            connack = evt->param.connack.return_code;
        }
        session_up = connack == 0;
        break;

    case MQTT_EVT_DISCONNECT:
        session_up = false;
        break;

    case MQTT_EVT_PUBLISH:
        on_publish(client, &evt->param.publish);
        break;

    case MQTT_EVT_PUBREL: {
        struct mqtt_pubcomp_param comp = {.message_id = evt->param.pubrel.message_id};

        (void)mqtt_publish_qos2_complete(client, &comp);
        break;
    }

    case MQTT_EVT_SUBACK:
        for (uint32_t i = 0; i < evt->param.suback.return_codes.len; i++) {
            if (evt->param.suback.return_codes.data[i] == MQTT_SUBACK_FAILURE) {
                LOG_ERR("the broker refused a subscription (message %u): check its ACL",
                        evt->param.suback.message_id);
            }
        }
        break;

    default:
        break;
    }
}

int mqtt_glue_publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos,
                      bool retain)
{
    struct mqtt_publish_param param;

    ARG_UNUSED(ctx);
    if (bound_client == NULL || !session_up) {
        return -ENOTCONN;
    }
    if (len > UINT32_MAX) {
        return -EMSGSIZE;
    }
    memset(&param, 0, sizeof(param));
    param.message.topic.topic.utf8 = (const uint8_t *)topic;
    param.message.topic.topic.size = strlen(topic);
    param.message.topic.qos = qos > 0 ? MQTT_QOS_1_AT_LEAST_ONCE : MQTT_QOS_0_AT_MOST_ONCE;
    /* The client only reads the payload; the field is not const-qualified. */
    param.message.payload.data = (uint8_t *)payload;
    param.message.payload.len = (uint32_t)len;
    param.message_id = qos > 0 ? next_message_id() : 0;
    param.retain_flag = retain ? 1 : 0;

    int rc = mqtt_publish(bound_client, &param);

    if (rc != 0) {
        LOG_WRN("publish to %s failed (%d)", topic, rc);
    }
    return rc;
}

int mqtt_glue_subscribe(void *ctx, const char *filter, int qos)
{
    struct mqtt_topic topic = {
        .topic = {.utf8 = (const uint8_t *)filter, .size = strlen(filter)},
        .qos = qos > 0 ? MQTT_QOS_1_AT_LEAST_ONCE : MQTT_QOS_0_AT_MOST_ONCE,
    };
    struct mqtt_subscription_list list = {
        .list = &topic,
        .list_count = 1,
        .message_id = next_message_id(),
    };

    ARG_UNUSED(ctx);
    if (bound_client == NULL || !session_up) {
        return -ENOTCONN;
    }
    return mqtt_subscribe(bound_client, &list);
}
