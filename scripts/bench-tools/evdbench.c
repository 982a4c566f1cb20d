// Small, dependency-free probes for scripts/bench, in C so that the client's own cost is negligible
// next to what is measured.
//
//   evdbench pingpong N            raw Unix-socket ping-pong between two processes (the physical limit)
//   evdbench client SOCKET N SQL   N sequential `execute` requests to evd, one at a time
//   evdbench listener SOCKET EVENT a veto listener that allows every veto of EVENT, until killed
//   evdbench insert SOCKET TABLE TOTAL BATCH [TIMEOUT_S]
//                                  create_table TABLE, then TOTAL rows as `insert` requests of BATCH rows,
//                                  one after another (all request lines are built before timing)
//   evdbench count SOCKET EVENT EXPECTED READY_FILE [TIMEOUT_S] [SINCE=S] [ROWS=1]
//                                  subscribes to EVENT, creates READY_FILE once subscribed, and exits when
//                                  it has seen EXPECTED rows (insert-rows/upsert-rows: the sum of num_rows)
//                                  or EXPECTED events (any other event). SINCE=S subscribes with `since`
//                                  (a replay of the journal after seq S; a `gap` notice is an error),
//                                  ROWS=1 with `rows: true`
//   evdbench exec SOCKET SQL... [TIMEOUT_S=N]
//                                  one `execute` per SQL, in order; times the last, and reports the first
//                                  value of its first row when it is an integer (`value`)
//
// `pingpong` and `client` print one line of JSON: {"n":..,"p50_us":..,"p99_us":..,"per_sec":..}.
// `insert`, `count` and `exec` print one line of JSON with CLOCK_MONOTONIC timestamps (`start_us`,
// `first_us`, `last_us`, `end_us`; comparable across processes), or {"error":"..."} and exit 1.
// Every wait they do is bounded (TIMEOUT_S, default 60 s overall and 10 s without any data), so a
// daemon that never answers cannot hang the bench.
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(double *lat, int n, double total_us) {
    qsort(lat, n, sizeof(double), cmp_double);
    printf("{\"n\":%d,\"p50_us\":%.2f,\"p99_us\":%.2f,\"per_sec\":%.0f}\n", n, lat[n / 2], lat[(int)(n * 0.99)],
           n / (total_us / 1e6));
}

// A line reader over a socket. With `deadline_us` set (CLOCK_MONOTONIC µs), a read waits at most until
// then, and at most `idle_us` without data; a timeout sets `timed_out` and returns NULL.
#define READER_CAP (4 << 20)
typedef struct {
    int fd;
    char buf[READER_CAP];
    size_t start, end;
    double deadline_us, idle_us;
    int timed_out;
} reader_t;

static int wait_readable(reader_t *r) {
    if (r->deadline_us <= 0) return 1;
    double left = r->deadline_us - now_us();
    if (r->idle_us > 0 && r->idle_us < left) left = r->idle_us;
    if (left <= 0) return r->timed_out = 1, 0;
    struct pollfd p = {.fd = r->fd, .events = POLLIN};
    for (;;) {
        int n = poll(&p, 1, (int)(left / 1000) + 1);
        if (n > 0) return 1;
        if (n < 0 && errno == EINTR) continue;
        return r->timed_out = 1, 0;
    }
}

// Returns a pointer to the next line (NUL-terminated, without '\n'), or NULL at EOF.
static char *read_line(reader_t *r) {
    for (;;) {
        char *nl = memchr(r->buf + r->start, '\n', r->end - r->start);
        if (nl) {
            *nl = 0;
            char *line = r->buf + r->start;
            r->start = (nl - r->buf) + 1;
            return line;
        }
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, r->end - r->start);
            r->end -= r->start;
            r->start = 0;
        }
        if (r->end == sizeof(r->buf)) return NULL;
        if (!wait_readable(r)) return NULL;
        ssize_t got = read(r->fd, r->buf + r->end, sizeof(r->buf) - r->end);
        if (got <= 0) return NULL;
        r->end += got;
    }
}

static void write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("write");
            exit(1);
        }
        data += n;
        len -= n;
    }
}

static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        perror(path);
        exit(1);
    }
    return fd;
}

// The raw round trip: a line one way, a line back, between two processes over a Unix stream socket.
static int pingpong(int n) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return perror("socketpair"), 1;
    const char *msg = "{\"op\":\"ping\",\"id\":1}\n";
    const char *ans = "{\"type\":\"response\",\"id\":1,\"ok\":true,\"result\":{}}\n";
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        static reader_t r;
        r.fd = sv[1];
        while (read_line(&r)) write_all(sv[1], ans, strlen(ans));
        _exit(0);
    }
    close(sv[1]);
    static reader_t r;
    r.fd = sv[0];
    double *lat = malloc(sizeof(double) * n);
    for (int i = 0; i < n / 10; i++) {  // warm up
        write_all(sv[0], msg, strlen(msg));
        read_line(&r);
    }
    double start = now_us();
    for (int i = 0; i < n; i++) {
        double t = now_us();
        write_all(sv[0], msg, strlen(msg));
        if (!read_line(&r)) return fprintf(stderr, "pingpong: peer closed\n"), 1;
        lat[i] = now_us() - t;
    }
    double total = now_us() - start;
    close(sv[0]);
    waitpid(pid, NULL, 0);
    report(lat, n, total);
    return 0;
}

// Sequential execute requests, each waiting for its response.
static int client(const char *path, int n, const char *sql) {
    int fd = connect_unix(path);
    static reader_t r;
    r.fd = fd;
    if (!read_line(&r)) return fprintf(stderr, "client: no hello\n"), 1;
    char request[4096];
    int len = snprintf(request, sizeof(request), "{\"op\":\"execute\",\"sql\":\"%s\"}\n", sql);
    double *lat = malloc(sizeof(double) * n);
    for (int i = 0; i < n / 10; i++) {  // warm up: the pool, statement paths, the listener
        write_all(fd, request, len);
        read_line(&r);
    }
    double start = now_us();
    for (int i = 0; i < n; i++) {
        double t = now_us();
        write_all(fd, request, len);
        char *line = read_line(&r);
        if (!line) return fprintf(stderr, "client: connection closed\n"), 1;
        if (!strstr(line, "\"ok\":true")) return fprintf(stderr, "client: %s\n", line), 1;
        lat[i] = now_us() - t;
    }
    report(lat, n, now_us() - start);
    return 0;
}

// Allows every veto it is sent.
static int listener(const char *path, const char *event) {
    int fd = connect_unix(path);
    static reader_t r;
    r.fd = fd;
    if (!read_line(&r)) return 1;
    char request[512];
    int len = snprintf(request, sizeof(request),
                       "{\"op\":\"subscribe\",\"veto\":[\"%s\"],\"name\":\"bench-allow\",\"timeout_ms\":60000}\n", event);
    write_all(fd, request, len);
    char *line;
    while ((line = read_line(&r))) {
        if (strncmp(line, "{\"type\":\"veto\",\"seq\":", 21) != 0) {
            if (strstr(line, "\"type\":\"response\"")) {
                fprintf(stderr, "listener: %s\n", line);
                fflush(stderr);
            }
            continue;
        }
        long long seq = atoll(line + 21);
        char reply[128];
        int n = snprintf(reply, sizeof(reply), "{\"op\":\"reply\",\"seq\":%lld,\"action\":\"allow\"}\n", seq);
        write_all(fd, reply, n);
    }
    return 0;
}

// ---- Throughput probes: bulk insert, event fan-out ----

static double g_timeout_s = 60, g_idle_s = 10;

// Prints {"error":"..."} (the message JSON-escaped, cut at 400 bytes) and exits 1.
static void fail(const char *fmt, ...) {
    char msg[512], out[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t o = 0;
    for (const char *p = msg; *p && o < 400; p++) {
        unsigned char c = *p;
        if (c == '"' || c == '\\') out[o++] = '\\', out[o++] = c;
        else if (c < 0x20) o += sprintf(out + o, "\\u%04x", c);
        else out[o++] = c;
    }
    out[o] = 0;
    printf("{\"error\":\"%s\"}\n", out);
    exit(1);
}

static void arm(reader_t *r, int fd) {
    r->fd = fd;
    r->deadline_us = now_us() + g_timeout_s * 1e6;
    r->idle_us = g_idle_s * 1e6;
}

// The next line, or exit with a reason.
static char *expect_line(reader_t *r, const char *what) {
    char *line = read_line(r);
    if (line) return line;
    if (r->timed_out) fail("timed out waiting for %s (limit %.0f s)", what, g_timeout_s);
    fail("connection closed while waiting for %s", what);
    return NULL;
}

// Reads the next response (skipping anything else); exits unless it is ok.
static char *expect_ok(reader_t *r, const char *what) {
    for (;;) {
        char *line = expect_line(r, what);
        if (!strstr(line, "\"type\":\"response\"")) continue;
        if (!strstr(line, "\"ok\":true")) fail("%s: %s", what, line);
        return line;
    }
}

static int connect_evd(const char *path, reader_t *r) {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) fail("connect %s: %s", path, strerror(errno));
    arm(r, fd);
    char *hello = expect_line(r, "hello");
    if (!strstr(hello, "\"type\":\"hello\"")) fail("expected hello, got: %s", hello);
    return fd;
}

// A JSON string literal of s (with quotes) into out; returns its length.
static size_t json_string(char *out, const char *s) {
    size_t o = 0;
    out[o++] = '"';
    for (; *s; s++) {
        unsigned char c = *s;
        if (c == '"' || c == '\\') out[o++] = '\\', out[o++] = c;
        else if (c < 0x20) o += sprintf(out + o, "\\u%04x", c);
        else out[o++] = c;
    }
    out[o++] = '"';
    out[o] = 0;
    return o;
}

// The bench rows; bench-tools/benchrows.py makes the same ones for Datasette and SQLAlchemy.
static const char *tags[] = {"alpha", "beta", "gamma", "delta"};
static int bench_row(char *out, long i) {
    return sprintf(out, "{\"id\":%ld,\"name\":\"name-%011ld\",\"score\":%.3f,\"tag\":\"%s\"}", i, i,
                   (i % 1000) * 0.25 + 0.125, tags[i % 4]);
}

// create_table TABLE, then TOTAL rows in `insert` requests of BATCH rows, each waiting for its response.
static int insert(const char *path, const char *table, long total, long batch) {
    static reader_t r;
    int fd = connect_evd(path, &r);
    char tname[512], req[2048];
    json_string(tname, table);
    int len = snprintf(req, sizeof(req),
                       "{\"op\":\"create_table\",\"id\":\"create\",\"table\":%s,\"columns\":["
                       "{\"name\":\"id\",\"type\":\"integer\"},{\"name\":\"name\",\"type\":\"text\"},"
                       "{\"name\":\"score\",\"type\":\"float\"},{\"name\":\"tag\",\"type\":\"text\"}],\"pk\":\"id\"}\n",
                       tname);
    write_all(fd, req, len);
    expect_ok(&r, "create_table");

    long nb = (total + batch - 1) / batch;
    char **lines = malloc(sizeof(char *) * nb);
    size_t *lens = malloc(sizeof(size_t) * nb);
    for (long b = 0; b < nb; b++) {
        long first = b * batch + 1, last = first + batch - 1;
        if (last > total) last = total;
        size_t cap = 256 + (size_t)(last - first + 1) * 128;
        char *p = lines[b] = malloc(cap);
        size_t o = sprintf(p, "{\"op\":\"insert\",\"id\":%ld,\"table\":%s,\"rows\":[", b, tname);
        for (long i = first; i <= last; i++) {
            if (i > first) p[o++] = ',';
            o += bench_row(p + o, i);
        }
        o += sprintf(p + o, "]}\n");
        lens[b] = o;
    }
    double *lat = malloc(sizeof(double) * nb);
    arm(&r, fd);
    double start = now_us();
    for (long b = 0; b < nb; b++) {
        double t = now_us();
        write_all(fd, lines[b], lens[b]);
        char *line = expect_ok(&r, "insert response");
        lat[b] = now_us() - t;
        char idkey[40], idend[40];
        snprintf(idkey, sizeof(idkey), "\"id\":%ld,", b);
        snprintf(idend, sizeof(idend), "\"id\":%ld}", b);
        if (!strstr(line, idkey) && !strstr(line, idend)) fail("insert response out of order (want id %ld): %s", b, line);
        if (b == 0 && !strstr(line, "\"inserted\":")) fail("insert response has no inserted count: %s", line);
    }
    double end = now_us();
    qsort(lat, nb, sizeof(double), cmp_double);
    printf("{\"n\":%ld,\"batch\":%ld,\"batches\":%ld,\"start_us\":%.0f,\"end_us\":%.0f,\"p50_us\":%.2f,"
           "\"p99_us\":%.2f,\"per_sec\":%.0f}\n",
           total, batch, nb, start, end, lat[nb / 2], lat[(long)(nb * 0.99)], total / ((end - start) / 1e6));
    return 0;
}

// Subscribes to EVENT (with `since` when since >= 0, with `rows: true` when rows) and reads until
// EXPECTED rows (insert-rows/upsert-rows: sum of num_rows) or events have arrived. A `lagged` or `gap`
// notice is reported as an error, as is a timeout. `start_us` is when the subscribe request was sent.
static int count(const char *path, const char *event, long expected, const char *ready_file, long long since,
                 int with_rows) {
    static reader_t r;
    int fd = connect_evd(path, &r);
    int big = 64 << 20;  // the daemon writes in bursts; let the kernel hold as much as it will
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
    char ename[512], req[1024], opts[128] = "";
    json_string(ename, event);
    if (since >= 0) snprintf(opts, sizeof(opts), ",\"since\":%lld", since);
    if (with_rows) strcat(opts, ",\"rows\":true");
    int len = snprintf(req, sizeof(req),
                       "{\"op\":\"subscribe\",\"id\":\"sub\",\"events\":[%s],\"name\":\"bench-count\"%s}\n", ename, opts);
    double start = now_us();
    write_all(fd, req, len);
    char *resp = expect_ok(&r, "subscribe");
    char *hs = strstr(resp, "\"seq\":");
    long long head = hs ? atoll(hs + 6) : -1;
    r.idle_us = 0;  // until the first event, only the overall timeout: the work may take a while to commit
    int rf = open(ready_file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (rf >= 0) close(rf);

    int by_rows = !strcmp(event, "insert-rows") || !strcmp(event, "upsert-rows");
    char want[600];
    snprintf(want, sizeof(want), "\"event\":%s", ename);
    long events = 0, rows = 0, seen = 0;
    long long first_seq = -1, last_seq = -1, bytes = 0;
    double first = 0;
    while (seen < expected) {
        char *line = read_line(&r);
        if (!line) {
            if (r.timed_out && now_us() < r.deadline_us)
                fail("timed out: %ld of %ld %s, then nothing for %.0f s", seen, expected, by_rows ? "rows" : "events",
                     g_idle_s);
            if (r.timed_out)
                fail("timed out: %ld of %ld %s within %.0f s", seen, expected, by_rows ? "rows" : "events", g_timeout_s);
            fail("connection closed after %ld of %ld %s", seen, expected, by_rows ? "rows" : "events");
        }
        if (strncmp(line, "{\"type\":\"event\"", 15) != 0 && !strstr(line, "\"type\":\"event\"")) {
            if (strstr(line, "\"type\":\"notice\"") && strstr(line, "\"lagged\""))
                fail("lagged after %ld of %ld %s: %s", seen, expected, by_rows ? "rows" : "events", line);
            if (strstr(line, "\"type\":\"notice\"") && strstr(line, "\"gap\""))
                fail("the journal no longer holds what the replay needs, after %ld of %ld %s: %s", seen, expected,
                     by_rows ? "rows" : "events", line);
            if (strstr(line, "\"type\":\"response\"") && strstr(line, "\"ok\":false")) fail("%s", line);
            continue;
        }
        if (!strstr(line, want)) continue;
        if (!first) first = now_us(), r.idle_us = g_idle_s * 1e6;
        events++;
        bytes += strlen(line) + 1;
        char *sq = strstr(line, "\"seq\":");  // the envelope's second key: found at once
        last_seq = sq ? atoll(sq + 6) : -1;
        if (first_seq < 0) first_seq = last_seq;
        if (by_rows) {
            char *n = strstr(line, "\"num_rows\":");
            if (!n) fail("%s event without num_rows: %s", event, line);
            rows += atol(n + 11);
            seen = rows;
        } else {
            seen = events;
        }
    }
    double last = now_us();
    printf("{\"event\":%s,\"events\":%ld,\"rows\":%ld,\"start_us\":%.0f,\"first_us\":%.0f,\"last_us\":%.0f,"
           "\"head_seq\":%lld,\"first_seq\":%lld,\"last_seq\":%lld,\"bytes\":%lld}\n",
           ename, events, by_rows ? rows : 0, start, first, last, head, first_seq, last_seq, bytes);
    return 0;
}

// One `execute` per SQL, in order, each waiting for its response; reports the timing of the last.
static int exec_sql(const char *path, int nsql, char **sqls) {
    static reader_t r;
    int fd = connect_evd(path, &r);
    double start = 0, end = 0;
    char *line = NULL;
    for (int i = 0; i < nsql; i++) {
        size_t cap = strlen(sqls[i]) * 6 + 128;
        char *req = malloc(cap);
        size_t o = sprintf(req, "{\"op\":\"execute\",\"id\":%d,\"sql\":", i);
        o += json_string(req + o, sqls[i]);
        o += sprintf(req + o, "}\n");
        arm(&r, fd);
        r.idle_us = 0;  // one statement may run long: only the overall timeout
        start = now_us();
        write_all(fd, req, o);
        line = expect_ok(&r, "execute");
        end = now_us();
        free(req);
    }
    char *ch = line ? strstr(line, "\"changes\":") : NULL;
    printf("{\"start_us\":%.0f,\"end_us\":%.0f,\"changes\":%ld", start, end, ch ? atol(ch + 10) : -1L);
    char *v = line ? strstr(line, "\"rows\":[[") : NULL, *vend;
    long long value = v ? strtoll(v + 9, &vend, 10) : 0;
    if (v && vend != v + 9 && (*vend == ']' || *vend == ',')) printf(",\"value\":%lld", value);
    printf("}\n");
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "pingpong")) return pingpong(atoi(argv[2]));
    if (argc >= 5 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]), argv[4]);
    if (argc >= 4 && !strcmp(argv[1], "listener")) return listener(argv[2], argv[3]);
    if (argc >= 6 && !strcmp(argv[1], "insert")) {
        if (argc >= 7) g_timeout_s = atof(argv[6]);
        return insert(argv[2], argv[3], atol(argv[4]), atol(argv[5]));
    }
    if (argc >= 6 && !strcmp(argv[1], "count")) {
        long long since = -1;
        int with_rows = 0;
        for (int i = 6; i < argc; i++) {
            if (!strncmp(argv[i], "SINCE=", 6)) since = atoll(argv[i] + 6);
            else if (!strncmp(argv[i], "ROWS=", 5)) with_rows = atoi(argv[i] + 5) != 0;
            else if (i == 6) g_timeout_s = atof(argv[i]);
            else return fprintf(stderr, "count: unknown option %s\n", argv[i]), 2;
        }
        return count(argv[2], argv[3], atol(argv[4]), argv[5], since, with_rows);
    }
    if (argc >= 4 && !strcmp(argv[1], "exec")) {
        int n = argc - 3;
        if (!strncmp(argv[argc - 1], "TIMEOUT_S=", 10)) g_timeout_s = atof(argv[argc - 1] + 10), n--;
        return exec_sql(argv[2], n, argv + 3);
    }
    fprintf(stderr, "usage: evdbench pingpong N | client SOCKET N SQL | listener SOCKET EVENT\n"
                    "     | insert SOCKET TABLE TOTAL BATCH [TIMEOUT_S]\n"
                    "     | count SOCKET EVENT EXPECTED READY_FILE [TIMEOUT_S] [SINCE=S] [ROWS=1]\n"
                    "     | exec SOCKET SQL... [TIMEOUT_S=N]\n");
    return 2;
}
