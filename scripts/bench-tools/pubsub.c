// Event delivery for scripts/bench: one publisher, SUBS subscribers (each a process of its own), N
// messages, for evd and the pub/sub servers users would pick instead. The same client structure for
// all: the subscribers connect, subscribe and confirm first; then the publisher sends everything,
// pipelined (all its bytes are made before timing), reading acknowledgements as they come; each
// subscriber reads until it has N messages. per_sec is N*SUBS over the time from the publisher's
// first byte to the last subscriber's last message.
//
//   pubsub evd-emit   SOCKET     SUBS N [TIMEOUT_S] [DATA_BYTES]  N `emit` of bench.tick {"i":I}; each response
//                                                        awaited as it comes (evd reads at most its pipeline limit
//                                                        ahead); DATA_BYTES (at least 18): data {"i":"00..0I"} of
//                                                        that size instead (the durable-emit row beside JetStream)
//   pubsub evd-update SOCKET     SUBS N [TIMEOUT_S] SQL  one `execute` of SQL (an UPDATE of N rows); the
//                                                        subscribers count update-row events
//   pubsub redis      SOCKET     SUBS N [TIMEOUT_S] [PAYLOAD_BYTES]  PUBLISH bench.tick PAYLOAD, RESP, over a Unix socket;
//                                                        the first reply must count SUBS receivers
//   pubsub nats       HOST:PORT  SUBS N [TIMEOUT_S] [PAYLOAD_BYTES]  PUB bench.tick PAYLOAD, core NATS over TCP, then PING
//                                                        (its PONG: the server has read every PUB)
//
// PAYLOAD is {"i":"NNNNNNNNNN"} (18 bytes); PAYLOAD_BYTES (at least 18) pads the number with zeros to
// that size (scripts/bench runs the anchors a second time with payloads as large as evd's event lines).
// evd's emit carries {"i":I} as the event's data, inside evd's event envelope. Prints {"system","subs",
// "n","delivered","start_us","pub_end_us","last_us","per_sec","pub_per_sec","bytes_per_msg" (as received,
// framing included),"payload_bytes" (evd-emit: the data's, when sized)} or {"error":...}. A subscriber that gets a `lagged` notice, an error
// or a disconnect fails the run. Every wait is bounded by TIMEOUT_S (default 60) overall and 10 s
// without data.
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define CHANNEL "bench.tick"
#define PAYLOAD_MIN 18

static int g_payload = PAYLOAD_MIN;  // bytes of each Redis/NATS message's payload, or of evd-emit's data
static int g_data_sized;             // evd-emit: data of g_payload bytes, not {"i":I}

static const char *g_system, *g_address, *g_sql;
static int g_subs;
static long g_n;

static int is(const char *system) { return !strcmp(g_system, system); }

static int connect_tcp(const char *hostport) {
    char host[256];
    snprintf(host, sizeof(host), "%s", hostport);
    char *colon = strrchr(host, ':');
    if (!colon) fail("expected HOST:PORT, got %s", hostport);
    *colon = 0;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) fail("bad address %s", host);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) fail("connect %s: %s", hostport, strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

static int connect_plain_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) fail("connect %s: %s", path, strerror(errno));
    return fd;
}

// Reads until the buffer holds WANT at its start (exactly), then consumes it.
static void expect_bytes(reader_t *r, const char *want, const char *what) {
    size_t len = strlen(want);
    while (r->end - r->start < len)
        if (!fill(r)) fail("%s: %s after %.*s", what, r->timed_out ? "timed out" : "connection closed",
                           (int)(r->end - r->start), r->buf + r->start);
    if (memcmp(r->buf + r->start, want, len) != 0)
        fail("%s: expected %s, got %.*s", what, want, (int)(r->end - r->start < 200 ? r->end - r->start : 200),
             r->buf + r->start);
    r->start += len;
}

// NATS: reads the server's INFO line and sends CONNECT (no +OK acknowledgements).
static void nats_hello(int fd, reader_t *r) {
    char *info = expect_line(r, "INFO");
    if (strncmp(info, "INFO ", 5) != 0) fail("expected INFO, got %s", info);
    const char *connect = "CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"evd-bench\"}\r\n";
    write_all(fd, connect, strlen(connect));
}

// Counts frames of FRAME_LEN bytes that start with PREFIX until N have arrived; answers a NATS
// server's PING; anything else fails.
static void count_frames(int fd, reader_t *r, slot_t *slot, const char *prefix, size_t frame_len) {
    size_t plen = strlen(prefix);
    while (slot->count < g_n) {
        while (r->end - r->start >= 6 && slot->count < g_n) {
            char *f = r->buf + r->start;
            if (r->end - r->start >= frame_len && memcmp(f, prefix, plen) == 0) {
                r->start += frame_len;
                if (!slot->count++) slot->first_us = now_us(), r->idle_us = g_idle_s * 1e6;
                slot->bytes += frame_len;
            } else if (!memcmp(f, "PING\r\n", 6)) {
                write_all(fd, "PONG\r\n", 6);
                r->start += 6;
            } else if (r->end - r->start >= frame_len || *f == '-') {
                char *end = memchr(f, '\n', r->end - r->start);
                if (*f == '-' && !end) break;  // an error line, not whole yet
                fail("after %ld of %ld messages, unexpected: %.*s", slot->count, g_n,
                     (int)(end ? end - f : (r->end - r->start < 120 ? r->end - r->start : 120)), f);
            } else {
                break;
            }
        }
        if (slot->count >= g_n) break;
        if (!fill(r))
            fail("%s after %ld of %ld messages", r->timed_out ? "timed out" : "connection closed", slot->count, g_n);
    }
}

static int subscriber(int k, slot_t *slot, void *unused) {
    (void)unused;
    static reader_t r;
    int fd;
    if (is("evd-emit") || is("evd-update")) {
        // A client of the protocol: after notice `lagged` it reconnects and resumes with `since`.
        long long since = -1, last_seq = -1;
        long resumes = 0;
        double deadline = 0;
        for (;;) {
            fd = connect_evd(g_address, &r);
            if (deadline) r.deadline_us = deadline;  // resuming does not extend the time allowed
            deadline = r.deadline_us;
            big_rcvbuf(fd);
            char req[256], opts[64] = "";
            if (since >= 0) snprintf(opts, sizeof(opts), ",\"since\":%lld", since);
            int len = snprintf(req, sizeof(req), "{\"op\":\"subscribe\",\"id\":\"sub\",\"events\":[\"%s\"],\"name\":\"bench-sub-%d\"%s}\n",
                               is("evd-emit") ? CHANNEL : "update-row", k, opts);
            write_all(fd, req, len);
            expect_ok(&r, "subscribe");
            if (since < 0) {
                worker_ready();
                r.idle_us = 0;  // until the first event, only the overall timeout
            }
            while (slot->count < g_n) {
                char *line = read_line(&r);
                if (!line)
                    fail("%s after %ld of %ld events", r.timed_out ? "timed out" : "connection closed", slot->count, g_n);
                size_t len = strlen(line);
                if (!strncmp(line, "{\"type\":\"event\"", 15)) {
                    long long seq = event_seq(line);
                    if (seq <= last_seq) fail("seq %lld after %lld: a duplicate or out of order", seq, last_seq);
                    last_seq = seq;
                    if (!slot->count++) slot->first_us = now_us(), r.idle_us = g_idle_s * 1e6;
                    slot->bytes += len + 1;
                } else if (lagged_last_seq(line) >= 0) {
                    since = lagged_last_seq(line);
                    if (++resumes > 1000) fail("lagged more than 1000 times, after %ld of %ld events", slot->count, g_n);
                    break;
                }
            }
            if (slot->count >= g_n) break;
            close(fd);
        }
    } else if (is("redis")) {
        fd = connect_plain_unix(g_address);
        big_rcvbuf(fd);
        arm(&r, fd);
        const char *sub = "SUBSCRIBE " CHANNEL "\r\n";
        write_all(fd, sub, strlen(sub));
        expect_bytes(&r, "*3\r\n$9\r\nsubscribe\r\n$10\r\n" CHANNEL "\r\n:1\r\n", "SUBSCRIBE");
        worker_ready();
        r.idle_us = 0;
        char prefix[96];
        snprintf(prefix, sizeof(prefix), "*3\r\n$7\r\nmessage\r\n$10\r\n" CHANNEL "\r\n$%d\r\n", g_payload);
        count_frames(fd, &r, slot, prefix, strlen(prefix) + g_payload + 2);
    } else {
        fd = connect_tcp(g_address);
        big_rcvbuf(fd);
        arm(&r, fd);
        nats_hello(fd, &r);
        const char *sub = "SUB " CHANNEL " 1\r\nPING\r\n";
        write_all(fd, sub, strlen(sub));
        expect_bytes(&r, "PONG\r\n", "SUB");
        worker_ready();
        r.idle_us = 0;
        char prefix[64];
        snprintf(prefix, sizeof(prefix), "MSG " CHANNEL " 1 %d\r\n", g_payload);
        count_frames(fd, &r, slot, prefix, strlen(prefix) + g_payload + 2);
    }
    slot->last_us = now_us();
    return 0;
}

// Everything the publisher sends, and how many acknowledgements it then waits for.
static char *build(size_t *len, long *acks) {
    size_t cap = 256 + (size_t)g_n * (96 + g_payload) + (g_sql ? strlen(g_sql) * 6 : 0), o = 0;
    char *buf = malloc(cap);
    if (is("evd-emit")) {
        for (long i = 0; i < g_n; i++)
            o += g_data_sized
                     ? sprintf(buf + o, "{\"op\":\"emit\",\"id\":%ld,\"event\":\"" CHANNEL "\",\"data\":{\"i\":\"%0*ld\"}}\n", i,
                               g_payload - 8, i)
                     : sprintf(buf + o, "{\"op\":\"emit\",\"id\":%ld,\"event\":\"" CHANNEL "\",\"data\":{\"i\":%ld}}\n", i, i);
        *acks = g_n;
    } else if (is("evd-update")) {
        o += sprintf(buf + o, "{\"op\":\"execute\",\"id\":\"update\",\"sql\":");
        o += json_string(buf + o, g_sql);
        o += sprintf(buf + o, "}\n");
        *acks = 1;
    } else if (is("redis")) {
        for (long i = 0; i < g_n; i++)
            o += sprintf(buf + o, "*3\r\n$7\r\nPUBLISH\r\n$10\r\n" CHANNEL "\r\n$%d\r\n{\"i\":\"%0*ld\"}\r\n", g_payload,
                         g_payload - 8, i);
        *acks = g_n;
    } else {
        for (long i = 0; i < g_n; i++)
            o += sprintf(buf + o, "PUB " CHANNEL " %d\r\n{\"i\":\"%0*ld\"}\r\n", g_payload, g_payload - 8, i);
        o += sprintf(buf + o, "PING\r\n");
        *acks = 1;
    }
    *len = o;
    return buf;
}

// Whether LINE (without its '\n') is an acknowledgement; fails on an error.
static int is_ack(char *line, long seen) {
    if (is("evd-emit") || is("evd-update")) {
        if (!strstr(line, "\"type\":\"response\"")) return 0;
        if (!strstr(line, "\"ok\":true")) fail("publisher, after %ld acknowledgements: %s", seen, line);
        return 1;
    }
    if (is("redis")) {
        if (line[0] != ':') fail("publisher, after %ld replies: %s", seen, line);
        if (seen == 0 && atol(line + 1) != g_subs) fail("PUBLISH reached %ld subscribers, not %d", atol(line + 1), g_subs);
        return 1;
    }
    if (!strncmp(line, "PONG", 4)) return 1;
    if (line[0] == '-') fail("publisher: %s", line);
    return 0;  // INFO (sent again on cluster changes), +OK
}

// Sends BUF while reading acknowledgements, until ACKS have come; returns when the last did.
static double publish(int fd, reader_t *r, const char *buf, size_t len, long acks) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    size_t off = 0;
    long seen = 0;
    double deadline = now_us() + g_timeout_s * 1e6, last_data = now_us();
    // evd answers a line at a time; lines left in the reader from the handshake come first
    for (char *nl; (nl = memchr(r->buf + r->start, '\n', r->end - r->start));) {
        *nl = 0;
        seen += is_ack(r->buf + r->start, seen);
        r->start = nl - r->buf + 1;
    }
    while (seen < acks) {
        double now = now_us();
        if (now > deadline) fail("publisher timed out after %ld of %ld acknowledgements (limit %.0f s)", seen, acks, g_timeout_s);
        if (!is("evd-update") && now - last_data > g_idle_s * 1e6)  // one UPDATE may run long: only the deadline
            fail("publisher: nothing for %.0f s after %ld of %ld acknowledgements", g_idle_s, seen, acks);
        struct pollfd p = {.fd = fd, .events = POLLIN | (off < len ? POLLOUT : 0)};
        int n = poll(&p, 1, 100);
        if (n < 0 && errno != EINTR) fail("poll: %s", strerror(errno));
        if (n <= 0) continue;
        if (p.revents & POLLOUT) {
            ssize_t w = write(fd, buf + off, len - off < (1 << 20) ? len - off : (1 << 20));
            if (w > 0) off += w, last_data = now_us();
            else if (w < 0 && errno != EAGAIN && errno != EINTR) fail("publisher write: %s", strerror(errno));
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            if (r->start > 0) {
                memmove(r->buf, r->buf + r->start, r->end - r->start);
                r->end -= r->start;
                r->start = 0;
            }
            ssize_t got = read(fd, r->buf + r->end, sizeof(r->buf) - r->end);
            if (got == 0) fail("publisher: connection closed after %ld of %ld acknowledgements", seen, acks);
            if (got < 0 && errno != EAGAIN && errno != EINTR) fail("publisher read: %s", strerror(errno));
            if (got > 0) {
                r->end += got, last_data = now_us();
                for (char *nl; (nl = memchr(r->buf + r->start, '\n', r->end - r->start));) {
                    *nl = 0;
                    seen += is_ack(r->buf + r->start, seen);
                    r->start = nl - r->buf + 1;
                }
            }
        }
    }
    return now_us();
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 5) {
        fprintf(stderr, "usage: pubsub evd-emit|evd-update|redis|nats ADDRESS SUBS N [TIMEOUT_S] [SQL|PAYLOAD_BYTES|DATA_BYTES]\n");
        return 2;
    }
    g_system = argv[1], g_address = argv[2], g_subs = atoi(argv[3]), g_n = atol(argv[4]);
    if (argc >= 6) g_timeout_s = atof(argv[5]);
    if (argc >= 7 && is("evd-update")) g_sql = argv[6];
    if (argc >= 7 && (is("redis") || is("nats") || is("evd-emit"))) {
        g_data_sized = is("evd-emit");
        g_payload = atoi(argv[6]);
        if (g_payload < PAYLOAD_MIN || g_payload > 1 << 20) fail("PAYLOAD_BYTES must be %d to 1048576", PAYLOAD_MIN);
    }
    if (!is("evd-emit") && !is("evd-update") && !is("redis") && !is("nats")) fail("unknown system %s", g_system);
    if (is("evd-update") && !g_sql) fail("evd-update needs SQL");
    if (g_subs < 1 || g_n < 1) fail("SUBS and N must be at least 1");

    size_t len;
    long acks;
    char *buf = build(&len, &acks);
    workers_t w;
    workers_start(&w, g_subs, subscriber, NULL);
    workers_wait_ready(&w, 30);

    static reader_t r;
    int fd;
    if (is("evd-emit") || is("evd-update")) {
        fd = connect_evd(g_address, &r);
    } else if (is("redis")) {
        fd = connect_plain_unix(g_address);
        arm(&r, fd);
    } else {
        fd = connect_tcp(g_address);
        arm(&r, fd);
        nats_hello(fd, &r);
    }
    big_rcvbuf(fd);
    double start = now_us();
    double pub_end = publish(fd, &r, buf, len, acks);
    workers_join(&w, g_timeout_s + 5);
    double last = start;
    long delivered = 0;
    long long bytes = 0;
    for (int k = 0; k < g_subs; k++) {
        if (w.slots[k].last_us > last) last = w.slots[k].last_us;
        delivered += w.slots[k].count;
        bytes += w.slots[k].bytes;
    }
    printf("{\"system\":\"%s\",\"subs\":%d,\"n\":%ld,\"delivered\":%ld,\"start_us\":%.0f,\"pub_end_us\":%.0f,"
           "\"last_us\":%.0f,\"per_sec\":%.0f,\"pub_per_sec\":%.0f,\"bytes_per_msg\":%.1f,\"payload_bytes\":%d}\n",
           g_system, g_subs, g_n, delivered, start, pub_end, last, delivered / ((last - start) / 1e6),
           g_n / ((pub_end - start) / 1e6), delivered ? (double)bytes / delivered : 0,
           is("redis") || is("nats") || g_data_sized ? g_payload : 0);
    return 0;
}
