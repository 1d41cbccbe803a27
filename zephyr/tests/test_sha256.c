/* SHA-256 against the FIPS 180-4 / NIST example vectors, whole and in every split. */
#include <stdio.h>

#include "harness.h"
#include "internal.h"

static void hex(const uint8_t d[32], char out[65])
{
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static const char *digest_of(const char *text)
{
    static char out[65];
    uint8_t d[32];
    pb_sha256((const uint8_t *)text, strlen(text), d);
    hex(d, out);
    return out;
}

static const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
static const char *m896 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmn"
                          "hijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";

static void vectors(void)
{
    CHECK_STR(digest_of(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK_STR(digest_of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK_STR(digest_of(m448), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    CHECK_STR(digest_of(m896), "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

static void million_a(void)
{
    static uint8_t a[1000];
    memset(a, 'a', sizeof a);
    struct pb_sha256 s;
    pb_sha256_init(&s);
    /* Uneven pieces cross block boundaries in every way. */
    size_t done = 0, step = 1;
    while (done < 1000000) {
        size_t n = step > 1000000 - done ? 1000000 - done : step;
        if (n > sizeof a)
            n = sizeof a;
        pb_sha256_update(&s, a, n);
        done += n;
        step = step % 997 + 13;
    }
    uint8_t d[32];
    char out[65];
    pb_sha256_final(&s, d);
    hex(d, out);
    CHECK_STR(out, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

static void every_split(void)
{
    size_t n = strlen(m896);
    for (size_t cut = 0; cut <= n; cut++) {
        struct pb_sha256 s;
        uint8_t d[32];
        char out[65];
        pb_sha256_init(&s);
        pb_sha256_update(&s, (const uint8_t *)m896, cut);
        pb_sha256_update(&s, (const uint8_t *)m896 + cut, n - cut);
        pb_sha256_final(&s, d);
        hex(d, out);
        CHECK_STR(out, "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    }
}

void suite_sha256(void)
{
    RUN(vectors);
    RUN(million_a);
    RUN(every_split);
}
