/* The Propeller board agent on Zephyr: boot, configuration, network, and the MQTT session.
 *
 * main() loads the configuration (settings in NVS over Kconfig defaults), sets up the core with
 * the platform callbacks of the glue files, brings the network up and then keeps one MQTT
 * session alive: connect with the core's retained last will, wait for the CONNACK, tell the
 * core, and loop on poll() over the socket with mqtt_input(), mqtt_live() and pb_tick(). A
 * lost session is aborted and retried with jittered exponential backoff; the core keeps
 * ticking (and tasks keep running) in between.
 *
 * This thread is the only one that calls into the core.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zephyr/drivers/hwinfo.h>
#include <zephyr/kernel.h>
#include <zephyr/logging/log.h>
#include <zephyr/net/mqtt.h>
#include <zephyr/net/net_if.h>
#include <zephyr/net/socket.h>
#include <zephyr/random/random.h>
#include <zephyr/sys/util.h>

#if defined(CONFIG_PROPELLER_TLS)
#include <zephyr/net/tls_credentials.h>
#endif
#if defined(CONFIG_WIFI)
#include <zephyr/net/net_mgmt.h>
#include <zephyr/net/wifi_mgmt.h>
#endif
#if defined(CONFIG_NET_DHCPV4)
#include <zephyr/net/dhcpv4.h>
#endif
#if defined(CONFIG_USB_DEVICE_STACK)
#include <zephyr/usb/usb_device.h>
#endif
#if defined(CONFIG_SNTP)
#include <zephyr/net/sntp.h>
#endif

#include "glue.h"
#include "propeller/core.h"

LOG_MODULE_REGISTER(propeller, CONFIG_PROPELLER_LOG_LEVEL);

/* ---- configuration -------------------------------------------------------------------- */

#define CONNACK_TIMEOUT_MS 10000
#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000
#define MISSED_PINGS_MAX 2
#define PING_INTERVAL_MS (CONFIG_PROPELLER_MQTT_KEEPALIVE_S * 1000 / 2)
#define WIFI_RETRY_EVERY 3

struct agent_config {
    char id[PB_ID_LEN + 1];
    char domain[PB_ID_LEN + 1];
    char channel[PB_ID_LEN + 1];
    char labels[PB_LABELS_MAX * (PB_LABEL_KEY_LEN + PB_LABEL_VALUE_LEN + 2)];
    char host[128];
    uint16_t port;
    char user[128];
    char pass[128];
#if defined(CONFIG_WIFI)
    char ssid[33];
    char psk[65];
#endif
};

static struct agent_config cfg;
static struct pb_label labels[PB_LABELS_MAX];
static int label_count;

static void config_string(const char *key, char *out, size_t cap, const char *fallback)
{
    if (kv_glue_config(key, out, cap) > 0) {
        return;
    }
    snprintf(out, cap, "%s", fallback);
}

static void default_id(char *out, size_t cap)
{
    uint8_t hw[8];
    ssize_t n = hwinfo_get_device_id(hw, sizeof(hw));

    if (n <= 0) {
        snprintf(out, cap, "zephyr-%s", CONFIG_BOARD);
        return;
    }
    size_t used = (size_t)snprintf(out, cap, "board-");

    for (ssize_t i = 0; i < n && used + 2 < cap; i++) {
        used += (size_t)snprintf(out + used, cap - used, "%02x", hw[i]);
    }
}

/* "k=v,k=v" into labels[], after the board label. Malformed entries are skipped. */
static void parse_labels(char *text)
{
    labels[0].key = "board";
    labels[0].value = CONFIG_BOARD;
    label_count = 1;

    for (char *item = text; item != NULL && *item != '\0' && label_count < PB_LABELS_MAX;) {
        char *next = strchr(item, ',');
        char *eq;

        if (next != NULL) {
            *next++ = '\0';
        }
        eq = strchr(item, '=');
        if (eq != NULL && eq != item && strcmp(item, "board") != 0) {
            *eq = '\0';
            labels[label_count].key = item;
            labels[label_count].value = eq + 1;
            label_count++;
        } else if (*item != '\0') {
            LOG_WRN("label \"%s\" ignored", item);
        }
        item = next;
    }
}

static void load_config(void)
{
    char port[8];

    config_string("id", cfg.id, sizeof(cfg.id), CONFIG_PROPELLER_ID);
    if (cfg.id[0] == '\0') {
        default_id(cfg.id, sizeof(cfg.id));
    }
    config_string("domain", cfg.domain, sizeof(cfg.domain), CONFIG_PROPELLER_DOMAIN);
    config_string("channel", cfg.channel, sizeof(cfg.channel), CONFIG_PROPELLER_CHANNEL);
    config_string("labels", cfg.labels, sizeof(cfg.labels), CONFIG_PROPELLER_LABELS);
    config_string("host", cfg.host, sizeof(cfg.host), CONFIG_PROPELLER_BROKER_HOST);
    config_string("user", cfg.user, sizeof(cfg.user), CONFIG_PROPELLER_MQTT_USER);
    config_string("pass", cfg.pass, sizeof(cfg.pass), CONFIG_PROPELLER_MQTT_PASSWORD);
#if defined(CONFIG_WIFI)
    config_string("ssid", cfg.ssid, sizeof(cfg.ssid), CONFIG_PROPELLER_WIFI_SSID);
    config_string("psk", cfg.psk, sizeof(cfg.psk), CONFIG_PROPELLER_WIFI_PSK);
#endif

    cfg.port = CONFIG_PROPELLER_BROKER_PORT;
    if (kv_glue_config("port", port, sizeof(port)) > 0) {
        unsigned long p = strtoul(port, NULL, 10);

        if (p > 0 && p <= UINT16_MAX) {
            cfg.port = (uint16_t)p;
        } else {
            LOG_WRN("setting pb/cfg/port \"%s\" is not a port: using %u", port, cfg.port);
        }
    }
    parse_labels(cfg.labels);
}

/* ---- platform callbacks kept here ----------------------------------------------------- */

static int64_t wall_offset_ms = -1; /* unix ms minus uptime ms, once SNTP answered */

static int64_t platform_now_ms(void *ctx)
{
    ARG_UNUSED(ctx);
    return k_uptime_get();
}

static int64_t platform_wall_ms(void *ctx)
{
    ARG_UNUSED(ctx);
    return wall_offset_ms < 0 ? -1 : wall_offset_ms + k_uptime_get();
}

static void platform_log(void *ctx, int level, const char *msg)
{
    ARG_UNUSED(ctx);
    switch (level) {
    case PB_LOG_ERROR:
        LOG_ERR("%s", msg);
        break;
    case PB_LOG_WARN:
        LOG_WRN("%s", msg);
        break;
    case PB_LOG_INFO:
        LOG_INF("%s", msg);
        break;
    default:
        LOG_DBG("%s", msg);
        break;
    }
}

static struct pb_platform platform = {
    .ctx = NULL,
    .now_ms = platform_now_ms,
    .wall_ms = platform_wall_ms,
    .publish = mqtt_glue_publish,
    .subscribe = mqtt_glue_subscribe,
    .wasm_start = wasm_glue_start,
    .wasm_stop = wasm_glue_stop,
    .kv_get = kv_glue_get,
    .kv_set = kv_glue_set,
    .log = platform_log,
    .sha256 = NULL,
};

/* ---- the core ------------------------------------------------------------------------- */

static uint8_t core_arena[PB_ARENA_BYTES] __aligned(8);
static pb_core *core;

static char will_topic_text[PB_TOPIC_MAX];
static char will_payload_text[PB_ID_LEN + 48];
static struct mqtt_topic will_topic;
static struct mqtt_utf8 will_message;

static pb_core *start_core(void)
{
    struct pb_identity identity = {
        .proplet_id = cfg.id,
        .domain = cfg.domain,
        .channel = cfg.channel,
        .labels = labels,
        .label_count = label_count,
        .heartbeat_ms = CONFIG_PROPELLER_HEARTBEAT_MS,
        .version = NULL,
    };
    pb_core *c = pb_init(core_arena, sizeof(core_arena), &platform, &identity);

    if (c == NULL && label_count > 1) {
        LOG_ERR("identity rejected: retrying without the configured labels");
        identity.label_count = 1;
        c = pb_init(core_arena, sizeof(core_arena), &platform, &identity);
    }
    return c;
}

/* Drains finished runs and drives the core's timers. */
static void service(void)
{
    wasm_glue_drain(core);
    pb_tick(core, k_uptime_get());
}

/* How long the loop may wait before the core needs a tick, capped by CONFIG_PROPELLER_LOOP_MS. */
static int loop_wait_ms(void)
{
    int64_t until = pb_next_deadline(core) - k_uptime_get();

    return (int)CLAMP(until, 0, CONFIG_PROPELLER_LOOP_MS);
}

/* Keeps the core serviced for `ms` milliseconds without a session. */
static void idle(int ms)
{
    int64_t until = k_uptime_get() + ms;

    for (int64_t left = ms; left > 0; left = until - k_uptime_get()) {
        int step = MAX(loop_wait_ms(), 1);

        k_msleep((int32_t)MIN(left, (int64_t)step));
        service();
    }
}

/* ---- network -------------------------------------------------------------------------- */

#if defined(CONFIG_WIFI)
static void wifi_request(void)
{
    struct net_if *iface = net_if_get_default();
    struct wifi_connect_req_params params = {
        .ssid = (const uint8_t *)cfg.ssid,
        .ssid_length = (uint8_t)strlen(cfg.ssid),
        .psk = (const uint8_t *)cfg.psk,
        .psk_length = (uint8_t)strlen(cfg.psk),
        .security = cfg.psk[0] != '\0' ? WIFI_SECURITY_TYPE_PSK : WIFI_SECURITY_TYPE_NONE,
        .channel = WIFI_CHANNEL_ANY,
        .timeout = SYS_FOREVER_MS,
    };

    if (cfg.ssid[0] == '\0') {
        LOG_ERR("no Wi-Fi SSID: set pb/cfg/ssid and pb/cfg/psk, or CONFIG_PROPELLER_WIFI_*");
        return;
    }
    int rc = net_mgmt(NET_REQUEST_WIFI_CONNECT, iface, &params, sizeof(params));

    if (rc != 0 && rc != -EALREADY) {
        LOG_WRN("Wi-Fi connect request failed (%d)", rc);
    } else {
        LOG_INF("joining Wi-Fi \"%s\"", cfg.ssid);
    }
}
#endif

static void network_start(void)
{
#if defined(CONFIG_USB_DEVICE_STACK)
    /* Ethernet over USB: the link comes up once the host has enumerated the board. */
    int rc = usb_enable(NULL);

    if (rc != 0 && rc != -EALREADY) {
        LOG_ERR("USB did not start (%d): no network", rc);
    }
#endif
#if defined(CONFIG_NET_DHCPV4)
    /* The client waits for the link and renews on its own. */
    net_dhcpv4_start(net_if_get_default());
#endif
#if defined(CONFIG_WIFI)
    wifi_request();
#endif
}

/* Called after failed sessions: lets the link layer try again. */
static void network_retry(int failures)
{
#if defined(CONFIG_WIFI)
    if (failures % WIFI_RETRY_EVERY == 0) {
        wifi_request();
    }
#else
    ARG_UNUSED(failures);
#endif
}

static void wall_clock_sync(void)
{
#if defined(CONFIG_SNTP)
    struct sntp_time ts;

    if (wall_offset_ms >= 0 || CONFIG_PROPELLER_SNTP_SERVER[0] == '\0') {
        return;
    }
    if (sntp_simple(CONFIG_PROPELLER_SNTP_SERVER, 3000, &ts) == 0) {
        int64_t unix_ms = (int64_t)ts.seconds * 1000 +
                          (int64_t)(((uint64_t)ts.fraction * 1000) >> 32);

        wall_offset_ms = unix_ms - k_uptime_get();
        LOG_INF("wall clock set from %s", CONFIG_PROPELLER_SNTP_SERVER);
    }
#endif
}

/* ---- TLS ------------------------------------------------------------------------------ */

#if defined(CONFIG_PROPELLER_TLS)
static const unsigned char ca_built_in[] = {
#include "propeller_ca.inc"
};
/* Room for the NUL that Mbed TLS wants after a PEM certificate. */
static unsigned char ca_cert[sizeof(ca_built_in) + 1];
static const sec_tag_t sec_tags[] = {CONFIG_PROPELLER_TLS_SEC_TAG};

static int tls_setup(void)
{
    size_t len = sizeof(ca_built_in);

    memcpy(ca_cert, ca_built_in, len);
    if (len >= 10 && memcmp(ca_built_in, "-----BEGIN", 10) == 0) {
        ca_cert[len++] = '\0';
    }
    int rc = tls_credential_add(CONFIG_PROPELLER_TLS_SEC_TAG, TLS_CREDENTIAL_CA_CERTIFICATE,
                                ca_cert, len);

    return rc == -EEXIST ? 0 : rc;
}
#endif

/* ---- the MQTT session ----------------------------------------------------------------- */

static uint8_t rx_buf[CONFIG_PROPELLER_MQTT_RX_BUF];
static uint8_t tx_buf[CONFIG_PROPELLER_MQTT_TX_BUF];
static struct mqtt_client client;
static struct sockaddr_storage broker;
static struct mqtt_utf8 user_name;
static struct mqtt_utf8 password;

static int resolve_broker(void)
{
    struct zsock_addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};
    struct zsock_addrinfo *res = NULL;
    char port[8];

    snprintf(port, sizeof(port), "%u", cfg.port);
    int rc = zsock_getaddrinfo(cfg.host, port, &hints, &res);

    if (rc != 0 || res == NULL) {
        LOG_WRN("cannot resolve %s (%d)", cfg.host, rc);
        return -EHOSTUNREACH;
    }
    memset(&broker, 0, sizeof(broker));
    memcpy(&broker, res->ai_addr, MIN((size_t)res->ai_addrlen, sizeof(broker)));
    zsock_freeaddrinfo(res);
    return 0;
}

static void client_setup(void)
{
    mqtt_client_init(&client);
    client.broker = &broker;
    client.evt_cb = mqtt_glue_event;
    client.client_id.utf8 = (const uint8_t *)cfg.id;
    client.client_id.size = strlen(cfg.id);
    if (cfg.user[0] != '\0') {
        user_name.utf8 = (const uint8_t *)cfg.user;
        user_name.size = strlen(cfg.user);
        client.user_name = &user_name;
        if (cfg.pass[0] != '\0') {
            password.utf8 = (const uint8_t *)cfg.pass;
            password.size = strlen(cfg.pass);
            client.password = &password;
        }
    }
    client.protocol_version = MQTT_VERSION_3_1_1;
    client.keepalive = CONFIG_PROPELLER_MQTT_KEEPALIVE_S;
    client.clean_session = 1;
    client.will_topic = &will_topic;
    client.will_message = &will_message;
    client.will_retain = 1;
    client.rx_buf = rx_buf;
    client.rx_buf_size = sizeof(rx_buf);
    client.tx_buf = tx_buf;
    client.tx_buf_size = sizeof(tx_buf);
#if defined(CONFIG_PROPELLER_TLS)
    client.transport.type = MQTT_TRANSPORT_SECURE;
    client.transport.tls.config.peer_verify = TLS_PEER_VERIFY_REQUIRED;
    client.transport.tls.config.cipher_list = NULL;
    client.transport.tls.config.sec_tag_list = sec_tags;
    client.transport.tls.config.sec_tag_count = ARRAY_SIZE(sec_tags);
    client.transport.tls.config.hostname = cfg.host;
#else
    client.transport.type = MQTT_TRANSPORT_NON_SECURE;
#endif
}

/* Waits for the socket to be readable or for the next tick. Returns the poll revents. */
static int wait_socket(void)
{
    int timeout = loop_wait_ms();
    int keepalive = mqtt_keepalive_time_left(&client);
    struct zsock_pollfd pfd = {.fd = mqtt_glue_fd(&client), .events = ZSOCK_POLLIN};

    if (keepalive >= 0 && keepalive < timeout) {
        timeout = keepalive;
    }
    int rc = zsock_poll(&pfd, 1, timeout);

    if (rc < 0) {
        return ZSOCK_POLLERR;
    }
    return rc == 0 ? 0 : pfd.revents;
}

/* One session, from connect to loss. Returns 1 when the broker accepted it, or a negative
 * value when it never came up. */
static int session(void)
{
    int rc = resolve_broker();

    if (rc != 0) {
        return rc;
    }
    client_setup();
    mqtt_glue_bind(&client, core);

    rc = mqtt_connect(&client);
    if (rc != 0) {
        LOG_WRN("cannot connect to %s:%u (%d)", cfg.host, cfg.port, rc);
        return rc;
    }
    /* Small packets should not wait for delayed ACKs (docs/protocol.md). */
    int one = 1;

    (void)zsock_setsockopt(mqtt_glue_fd(&client), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    int64_t deadline = k_uptime_get() + CONNACK_TIMEOUT_MS;

    while (mqtt_glue_connack() == -EINPROGRESS) {
        int ev = wait_socket();

        if (ev & ZSOCK_POLLIN) {
            rc = mqtt_input(&client);
            if (rc != 0 && rc != -EAGAIN) {
                break;
            }
        } else if (ev != 0) {
            break;
        }
        service();
        if (k_uptime_get() > deadline) {
            break;
        }
    }
    if (mqtt_glue_connack() != 0) {
        LOG_ERR("broker %s:%u refused or did not answer (%d)", cfg.host, cfg.port,
                mqtt_glue_connack());
        (void)mqtt_abort(&client);
        return -ECONNREFUSED;
    }

    int64_t last_ping = k_uptime_get();

    LOG_INF("connected to %s:%u as %s", cfg.host, cfg.port, cfg.id);
    wall_clock_sync();
    pb_on_connect(core);

    while (mqtt_glue_up()) {
        int ev = wait_socket();

        if (ev & ZSOCK_POLLIN) {
            rc = mqtt_input(&client);
            if (rc != 0 && rc != -EAGAIN) {
                LOG_WRN("session input failed (%d)", rc);
                break;
            }
        } else if (ev & (ZSOCK_POLLERR | ZSOCK_POLLHUP | ZSOCK_POLLNVAL)) {
            LOG_WRN("session socket closed");
            break;
        }
        rc = mqtt_live(&client);
        if (rc != 0 && rc != -EAGAIN) {
            LOG_WRN("keepalive failed (%d)", rc);
            break;
        }
        /* The client pings only when it has sent nothing for a keepalive period, which the
         * heartbeats prevent; ping anyway, so a half-open connection is noticed. */
        if (k_uptime_get() - last_ping >= PING_INTERVAL_MS) {
            last_ping = k_uptime_get();
            (void)mqtt_ping(&client);
        }
        if (client.unacked_ping > MISSED_PINGS_MAX) {
            LOG_WRN("broker stopped answering pings");
            break;
        }
        service();
    }

    (void)mqtt_abort(&client);
    pb_on_disconnect(core);
    LOG_INF("session with %s:%u ended", cfg.host, cfg.port);
    return 1;
}

/* ---- boot ----------------------------------------------------------------------------- */

int main(void)
{
    LOG_INF("Propeller board agent on %s", CONFIG_BOARD);

    if (kv_glue_init() != 0) {
        platform.kv_get = NULL;
        platform.kv_set = NULL;
    }
    load_config();
    if (crypto_glue_init() == 0) {
        platform.sha256 = crypto_glue_sha256;
    }
    if (wasm_glue_init() != 0) {
        LOG_ERR("no Wasm runtime: every task will fail to start");
    }

    core = start_core();
    if (core == NULL) {
        LOG_ERR("the core refused identity \"%s\" (domain %s, channel %s): fix pb/cfg/* "
                "with the settings shell and reboot",
                cfg.id, cfg.domain, cfg.channel);
        return 0;
    }

    int will_len = pb_will(core, will_topic_text, sizeof(will_topic_text), will_payload_text,
                           sizeof(will_payload_text));

    if (will_len < 0) {
        LOG_ERR("no room for the last will (%d)", will_len);
        return 0;
    }
    will_topic.topic.utf8 = (const uint8_t *)will_topic_text;
    will_topic.topic.size = strlen(will_topic_text);
    will_topic.qos = MQTT_QOS_1_AT_LEAST_ONCE;
    will_message.utf8 = (const uint8_t *)will_payload_text;
    will_message.size = (uint32_t)will_len;

#if defined(CONFIG_PROPELLER_TLS)
    int tls_rc = tls_setup();

    if (tls_rc != 0) {
        LOG_ERR("CA certificate not registered (%d): TLS sessions will fail", tls_rc);
    }
#endif

    LOG_INF("proplet %s, domain %s, channel %s, broker %s:%u, %d task slots", cfg.id,
            cfg.domain, cfg.channel, cfg.host, cfg.port, PB_MAX_TASKS);
    network_start();

    int backoff = BACKOFF_MIN_MS;
    int failures = 0;

    for (;;) {
        if (session() > 0) {
            backoff = BACKOFF_MIN_MS;
            failures = 0;
        } else {
            failures++;
            network_retry(failures);
        }
        /* Full jitter over the upper half, so a fleet that lost its broker does not return in
         * lockstep. */
        int wait = backoff / 2 + (int)(sys_rand32_get() % (uint32_t)(backoff / 2 + 1));

        idle(wait);
        backoff = MIN(backoff * 2, BACKOFF_MAX_MS);
    }
    return 0;
}
