// Small, dependency-free probes for scripts/bench (helpers in common.h), in C so that the client's own cost is negligible
// next to what is measured.
//
//   evdbench pingpong N            raw Unix-socket ping-pong between two processes (the physical limit)
//   evdbench client SOCKET N SQL   N sequential `execute` requests to evd, one at a time
//   evdbench listener SOCKET EVENT a veto listener that allows every veto of EVENT, until killed
//   evdbench insert SOCKET TABLE TOTAL BATCH [TIMEOUT_S] [DEPTH=N]
//                                  create_table TABLE, then TOTAL rows as `insert` requests of BATCH rows,
//                                  one after another (all request lines are built before timing); with
//                                  DEPTH=N, up to N requests are sent ahead of their responses (pipelined)
//   evdbench count SOCKET EVENT EXPECTED READY_FILE [TIMEOUT_S] [SINCE=S] [ROWS=1]
//                                  subscribes to EVENT, creates READY_FILE once subscribed, and exits when
//                                  it has seen EXPECTED rows (insert-rows/upsert-rows: the sum of num_rows)
//                                  or EXPECTED events (any other event). SINCE=S subscribes with `since`
//                                  (a replay of the journal after seq S; a `gap` notice is an error),
//                                  ROWS=1 with `rows: true`
//   evdbench exec SOCKET SQL... [TIMEOUT_S=N]
//                                  one `execute` per SQL, in order; times the last, and reports the first
//                                  value of its first row when it is an integer (`value`)
//   evdbench inserts SOCKET TABLE CLIENTS TOTAL [TIMEOUT_S]
//                                  create_table TABLE, then CLIENTS processes insert TOTAL rows between
//                                  them, one row per `insert` request (autocommit); p50/p99 per request
//   evdbench drain SOCKET READY_FILE EVENT...
//                                  a plain subscriber to EVENTs that reads and discards, until killed
//   evdbench idle SOCKET N READY_FILE EVENT [TIMEOUT_S]
//                                  N connections, each subscribed to EVENT, idle until killed
//   evdbench stall SOCKET EVENT READY_FILE [TIMEOUT_S]
//                                  a subscriber (on_overflow: drop) that never reads, until killed
//   evdbench request SOCKET JSON   one request; prints its response
//   evdbench snapshot SOCKET TABLE EXPECTED_ROWS [TIMEOUT_S]
//                                  subscribes to insert-rows with `snapshot`: TABLE, times from sending the
//                                  subscribe until notice `snapshot_end`, and checks that the pages held
//                                  EXPECTED_ROWS rows; then ("then stream") inserts one row (id -1) into
//                                  TABLE from a second connection and times until its insert-rows event
//                                  arrives on the subscription (`stream_us`; `caught_up_us`: from
//                                  snapshot_end to notice caught_up, -1 if it came after that event); the
//                                  row is deleted again, so that the next run finds EXPECTED_ROWS rows
//
// `pingpong` and `client` print one line of JSON: {"n":..,"p50_us":..,"p99_us":..,"per_sec":..}.
// `insert`, `count`, `exec` and `snapshot` print one line of JSON with CLOCK_MONOTONIC timestamps (`start_us`,
// `first_us`, `last_us`, `end_us`; comparable across processes), or {"error":"..."} and exit 1.
// Every wait they do is bounded (TIMEOUT_S, default 60 s overall and 10 s without any data), so a
// daemon that never answers cannot hang the bench.
#include "common.h"

static void report(double *lat, int n, double total_us) {
    double p50, p99;
    percentiles(lat, n, &p50, &p99);
    printf("{\"n\":%d,\"p50_us\":%.2f,\"p99_us\":%.2f,\"per_sec\":%.0f}\n", n, p50, p99, n / (total_us / 1e6));
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

// create_table TABLE, then TOTAL rows in `insert` requests of BATCH rows, with at most DEPTH requests
// sent and not yet answered (1: each waits for the last one's response).
static int insert(const char *path, const char *table, long total, long batch, long depth) {
    static reader_t r;
    int fd = connect_evd(path, &r);
    char tname[512];
    json_string(tname, table);
    create_bench_table(fd, &r, table);

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
    double *sent_at = malloc(sizeof(double) * nb);
    arm(&r, fd);
    double start = now_us();
    long sent = 0;
    for (long b = 0; b < nb; b++) {
        while (sent < nb && sent - b < depth) {
            sent_at[sent] = now_us();
            write_all(fd, lines[sent], lens[sent]);
            sent++;
        }
        char *line = expect_ok(&r, "insert response");
        lat[b] = now_us() - sent_at[b];
        char idkey[40], idend[40];
        snprintf(idkey, sizeof(idkey), "\"id\":%ld,", b);
        snprintf(idend, sizeof(idend), "\"id\":%ld}", b);
        if (!strstr(line, idkey) && !strstr(line, idend)) fail("insert response out of order (want id %ld): %s", b, line);
        if (b == 0 && !strstr(line, "\"inserted\":")) fail("insert response has no inserted count: %s", line);
    }
    double end = now_us();
    qsort(lat, nb, sizeof(double), cmp_double);
    printf("{\"n\":%ld,\"batch\":%ld,\"batches\":%ld,\"depth\":%ld,\"start_us\":%.0f,\"end_us\":%.0f,"
           "\"p50_us\":%.2f,\"p99_us\":%.2f,\"per_sec\":%.0f}\n",
           total, batch, nb, depth, start, end, lat[nb / 2], lat[(long)(nb * 0.99)], total / ((end - start) / 1e6));
    return 0;
}

// Subscribes to EVENT (with `since` when since >= 0, with `rows: true` when rows) and reads until
// EXPECTED rows (insert-rows/upsert-rows: sum of num_rows) or events have arrived. A `lagged` or `gap`
// notice is reported as an error, as is a timeout. `start_us` is when the subscribe request was sent.
// Connects and subscribes to the event named by the JSON string ENAME (after SINCE when >= 0, with
// row images when WITH_ROWS); returns the socket and sets *head to the response's seq.
static int count_subscribe(const char *path, reader_t *r, const char *ename, long long since, int with_rows,
                           long long *head) {
    int fd = connect_evd(path, r);
    big_rcvbuf(fd);  // the daemon writes in bursts; let the kernel hold as much as it will
    char req[1024], opts[128] = "";
    if (since >= 0) snprintf(opts, sizeof(opts), ",\"since\":%lld", since);
    if (with_rows) strcat(opts, ",\"rows\":true");
    int len = snprintf(req, sizeof(req),
                       "{\"op\":\"subscribe\",\"id\":\"sub\",\"events\":[%s],\"name\":\"bench-count\"%s}\n", ename, opts);
    write_all(fd, req, len);
    char *resp = expect_ok(r, "subscribe");
    char *hs = strstr(resp, "\"seq\":");
    *head = hs ? atoll(hs + 6) : -1;
    return fd;
}

// Counts events as a client of the protocol does: a `lagged` notice (the subscriber fell more than
// its queue behind) is followed by a new connection that resumes with `since` = the notice's
// `last_seq`, replaying from the journal what the queue could not hold. Resumes are reported.
static int count(const char *path, const char *event, long expected, const char *ready_file, long long since,
                 int with_rows) {
    static reader_t r;
    char ename[512];
    json_string(ename, event);
    double start = now_us();
    long long head;
    int fd = count_subscribe(path, &r, ename, since, with_rows, &head);
    r.idle_us = 0;  // until the first event, only the overall timeout: the work may take a while to commit
    touch(ready_file);

    int by_rows = !strcmp(event, "insert-rows") || !strcmp(event, "upsert-rows");
    char want[600];
    snprintf(want, sizeof(want), "\"event\":%s", ename);
    long events = 0, rows = 0, seen = 0, resumes = 0;
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
            long long resume_after = lagged_last_seq(line);
            if (resume_after >= 0) {
                if (++resumes > 1000) fail("lagged more than 1000 times, after %ld of %ld", seen, expected);
                close(fd);
                double deadline = r.deadline_us;
                long long resumed_head;
                fd = count_subscribe(path, &r, ename, resume_after, with_rows, &resumed_head);
                r.deadline_us = deadline;  // resuming does not extend the time allowed
                continue;
            }
            if (strstr(line, "\"type\":\"notice\"") && strstr(line, "\"lagged\""))
                fail("lagged without last_seq after %ld of %ld: %s", seen, expected, line);
            if (strstr(line, "\"type\":\"notice\"") && strstr(line, "\"gap\""))
                fail("the journal no longer holds what the replay needs, after %ld of %ld %s: %s", seen, expected,
                     by_rows ? "rows" : "events", line);
            if (strstr(line, "\"type\":\"response\"") && strstr(line, "\"ok\":false")) fail("%s", line);
            continue;
        }
        if (!strstr(line, want)) continue;
        long long seq = event_seq(line);
        if (seq >= 0 && last_seq >= 0 && seq <= last_seq) fail("seq %lld after %lld: a duplicate or out of order", seq, last_seq);
        if (!first) first = now_us(), r.idle_us = g_idle_s * 1e6;
        events++;
        bytes += strlen(line) + 1;
        last_seq = seq;
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
           "\"head_seq\":%lld,\"first_seq\":%lld,\"last_seq\":%lld,\"bytes\":%lld,\"resumes\":%ld}\n",
           ename, events, by_rows ? rows : 0, start, first, last, head, first_seq, last_seq, bytes, resumes);
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

// ---- Single-row inserts from one or more clients ----

typedef struct {
    const char *path, *table;
    int clients;
    long total;
    double *lat;  // shared: lat[id - 1] is the latency of the request that inserted row id
} inserts_arg_t;

// GROUP=0: the clients set the execution option group_commit to false (evd without commit groups).
static int g_group_commit = 1;

// One client: ids k+1, k+1+CLIENTS, ... one row per `insert` request, each waiting for its response.
static int insert_client(int k, slot_t *slot, void *varg) {
    inserts_arg_t *a = varg;
    static reader_t r;
    int fd = connect_evd(a->path, &r);
    if (!g_group_commit) {
        const char *options = "{\"op\":\"execution_options\",\"id\":0,\"options\":{\"group_commit\":false}}\n";
        write_all(fd, options, strlen(options));
        expect_ok(&r, "execution_options response");
    }
    char tname[512];
    json_string(tname, a->table);
    long n = 0;
    for (long id = k + 1; id <= a->total; id += a->clients) n++;
    char **lines = malloc(sizeof(char *) * (n ? n : 1));
    size_t *lens = malloc(sizeof(size_t) * (n ? n : 1));
    long j = 0;
    for (long id = k + 1; id <= a->total; id += a->clients, j++) {
        char *p = lines[j] = malloc(1024);
        size_t o = sprintf(p, "{\"op\":\"insert\",\"id\":%ld,\"table\":%s,\"rows\":[", id, tname);
        o += bench_row(p + o, id);
        o += sprintf(p + o, "]}\n");
        lens[j] = o;
    }
    worker_ready();
    worker_wait_go();
    arm(&r, fd);
    slot->start_us = now_us();
    j = 0;
    for (long id = k + 1; id <= a->total; id += a->clients, j++) {
        double t = now_us();
        write_all(fd, lines[j], lens[j]);
        char *line = expect_ok(&r, "insert response");
        a->lat[id - 1] = now_us() - t;
        if (!strstr(line, "\"inserted\":1")) fail("insert of row %ld: %s", id, line);
    }
    slot->last_us = now_us();
    slot->count = n;
    return 0;
}

// create_table TABLE, then CLIENTS processes insert rows 1..TOTAL between them, one row per `insert`
// request (each its own transaction). All connect and build their requests first, then start together;
// per_sec is TOTAL over the time until the last one is done, p50/p99 over every request.
static int inserts(const char *path, const char *table, int clients, long total) {
    static reader_t r;
    int fd = connect_evd(path, &r);
    create_bench_table(fd, &r, table);
    inserts_arg_t a = {path, table, clients, total, shared_alloc(sizeof(double) * total)};
    workers_t w;
    workers_start(&w, clients, insert_client, &a);
    workers_wait_ready(&w, 30);
    double start = workers_go(&w);
    workers_join(&w, g_timeout_s + 5);
    double end = start;
    for (int k = 0; k < clients; k++)
        if (w.slots[k].last_us > end) end = w.slots[k].last_us;
    double p50, p99;
    percentiles(a.lat, total, &p50, &p99);
    printf("{\"clients\":%d,\"n\":%ld,\"start_us\":%.0f,\"end_us\":%.0f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"per_sec\":%.0f}\n",
           clients, total, start, end, p50, p99, total / ((end - start) / 1e6));
    return 0;
}

// ---- Subscribers that cost the daemon something: plain, idle, stalled ----

// Sends subscribe for EVENTS (a JSON array's inside) with EXTRA (",\"key\":value..." or "") and waits
// for its OK.
static void subscribe(int fd, reader_t *r, const char *events, const char *extra) {
    char req[2048];
    int len = snprintf(req, sizeof(req), "{\"op\":\"subscribe\",\"id\":\"sub\",\"events\":[%s]%s}\n", events, extra);
    write_all(fd, req, len);
    expect_ok(r, "subscribe");
}

// EVENT names as the inside of a JSON array.
static void event_list(char *out, int n, char **events) {
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        if (i) out[o++] = ',';
        o += json_string(out + o, events[i]);
    }
    out[o] = 0;
}

// A plain subscriber to EVENTS: reads and discards every event until killed. A `lagged` notice or a
// closed connection makes it print {"error":...} and exit 1, so the bench knows it fell behind.
static int drain(const char *path, const char *ready_file, int nev, char **events) {
    static reader_t r;
    int fd = connect_evd(path, &r);
    big_rcvbuf(fd);
    char list[2048];
    event_list(list, nev, events);
    subscribe(fd, &r, list, ",\"name\":\"bench-drain\"");
    touch(ready_file);
    r.deadline_us = 0;  // events come only while the bench runs its client; it kills this one after
    long events_seen = 0;
    char *line;
    while ((line = read_line(&r))) {
        if (!strncmp(line, "{\"type\":\"event\"", 15)) {
            events_seen++;
            continue;
        }
        if (strstr(line, "\"type\":\"notice\"") && strstr(line, "\"lagged\"")) fail("lagged after %ld events: %s", events_seen, line);
    }
    fail("connection closed after %ld events", events_seen);
    return 1;
}

// N connections, each subscribed to EVENT, that then do nothing for TIMEOUT_S (or until killed).
static int idle(const char *path, int n, const char *ready_file, const char *event) {
    static reader_t r;
    char list[600];
    json_string(list, event);
    for (int i = 0; i < n; i++) {
        r.start = r.end = 0;
        int fd = connect_evd(path, &r);
        subscribe(fd, &r, list, ",\"name\":\"bench-idle\"");
    }
    touch(ready_file);
    sleep((unsigned)g_timeout_s);
    return 0;
}

// One subscriber to EVENT that never reads (a receive buffer as small as the kernel allows), with
// on_overflow "drop": it stays connected, its queue full, for TIMEOUT_S (or until killed).
static int stall(const char *path, const char *event, const char *ready_file) {
    static reader_t r;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    int small = 1;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) fail("connect %s: %s", path, strerror(errno));
    arm(&r, fd);
    if (!strstr(expect_line(&r, "hello"), "\"type\":\"hello\"")) fail("no hello");
    char list[600];
    json_string(list, event);
    subscribe(fd, &r, list, ",\"name\":\"bench-stalled\",\"on_overflow\":\"drop\"");
    touch(ready_file);
    sleep((unsigned)g_timeout_s);
    return 0;
}

// Sends one request line and prints its response.
static int request(const char *path, const char *json) {
    static reader_t r;
    int fd = connect_evd(path, &r);
    write_all(fd, json, strlen(json));
    write_all(fd, "\n", 1);
    char *line;
    do line = expect_line(&r, "the response");
    while (!strstr(line, "\"type\":\"response\""));
    printf("%s\n", line);
    return 0;
}

// ---- Snapshot then stream (issue 23) ----

// The number of row objects in a `snapshot-rows` page: the objects directly inside the array that
// follows `"rows":`, found by one pass that skips strings (so that a `{` or `}` in a text value does
// not count) and nested objects (a BLOB is `{"$base64":...}`, a non-UTF-8 text `{"$text_base64":...}`).
// No full JSON parse: rows are never decoded. -1 if the line has no rows array.
static long page_rows(const char *line) {
    // `,"rows":[` cannot occur inside the table's name: a quote in a JSON string is escaped.
    const char *p = strstr(line, ",\"rows\":[");
    if (!p) return -1;
    p += 9;
    long rows = 0;
    int depth = 1, in_string = 0;  // depth 1: inside the rows array
    for (; *p && depth > 0; p++) {
        char c = *p;
        if (in_string) {
            if (c == '\\') {
                if (p[1]) p++;
            } else if (c == '"') {
                in_string = 0;
            }
            continue;
        }
        switch (c) {
            case '"': in_string = 1; break;
            case '{':
                if (depth == 1) rows++;
                depth++;
                break;
            case '[': depth++; break;
            case '}':
            case ']': depth--; break;
        }
    }
    return depth == 0 ? rows : -1;
}

// Fails on what ends a snapshot subscription early or makes its stream incomplete.
static void snapshot_check_line(const char *line, long rows, long expected) {
    if (!strstr(line, "\"type\":\"notice\"") && !strstr(line, "\"type\":\"response\"")) return;
    if (strstr(line, "\"snapshot_failed\"")) fail("snapshot_failed after %ld of %ld rows: %s", rows, expected, line);
    if (strstr(line, "\"lagged\"")) fail("lagged after %ld of %ld rows: %s", rows, expected, line);
    if (strstr(line, "\"code\":\"gap\"")) fail("gap after %ld of %ld rows: %s", rows, expected, line);
    if (strstr(line, "\"type\":\"response\"") && strstr(line, "\"ok\":false")) fail("%s", line);
}

// Sends one `execute` of SQL (a JSON string literal inside) on FD and waits for its OK.
static void execute_ok(int fd, reader_t *r, const char *sql, const char *what) {
    char req[2048];
    size_t o = sprintf(req, "{\"op\":\"execute\",\"id\":\"%s\",\"sql\":", what);
    o += json_string(req + o, sql);
    o += sprintf(req + o, "}\n");
    write_all(fd, req, o);
    expect_ok(r, what);
}

static int snapshot(const char *path, const char *table, long expected) {
    static reader_t r, w;  // the subscription; the writer of the row that follows the snapshot
    char tname[512], sql[1200], qtable[600];
    json_string(tname, table);
    // The table's name as an SQL identifier.
    size_t q = 0;
    qtable[q++] = '"';
    for (const char *c = table; *c && q < sizeof(qtable) - 3; c++) {
        if (*c == '"') qtable[q++] = '"';
        qtable[q++] = *c;
    }
    qtable[q++] = '"', qtable[q] = 0;

    int wfd = connect_evd(path, &w);
    snprintf(sql, sizeof(sql), "delete from %s where id = -1", qtable);  // left by a run that failed midway
    execute_ok(wfd, &w, sql, "cleanup");

    int fd = connect_evd(path, &r);
    big_rcvbuf(fd);
    char req[1400];
    int len = snprintf(req, sizeof(req),
                       "{\"op\":\"subscribe\",\"id\":\"sub\",\"events\":[\"insert-rows\"],\"name\":\"bench-snapshot\","
                       "\"snapshot\":%s}\n",
                       tname);
    arm(&r, fd);
    double start = now_us();
    write_all(fd, req, len);
    char *resp = expect_ok(&r, "subscribe");
    char *hs = strstr(resp, "\"seq\":");
    long long head = hs ? atoll(hs + 6) : -1;

    long rows = 0, pages = 0;
    long long bytes = 0, end_seq = -1;
    double first = 0;
    for (;;) {
        char *line = read_line(&r);
        if (!line) {
            if (r.timed_out) fail("timed out after %ld of %ld rows (limit %.0f s, %.0f s without data)", rows, expected,
                                  g_timeout_s, g_idle_s);
            fail("connection closed after %ld of %ld rows", rows, expected);
        }
        if (!strncmp(line, "{\"type\":\"event\"", 15)) {
            if (!strstr(line, "\"event\":\"snapshot-rows\"")) fail("an event before snapshot_end: %.300s", line);
            long n = page_rows(line);
            if (n < 0) fail("a snapshot-rows page without a rows array: %.300s", line);
            if (!first) first = now_us();
            rows += n;
            pages++;
            bytes += strlen(line) + 1;
            continue;
        }
        snapshot_check_line(line, rows, expected);
        if (strstr(line, "\"type\":\"notice\"") && strstr(line, "\"snapshot_end\"")) {
            char *s = strstr(line, "\"seq\":");
            end_seq = s ? atoll(s + 6) : -1;
            break;
        }
    }
    double end = now_us();
    if (rows != expected) fail("the snapshot held %ld rows, not %ld", rows, expected);

    // Then stream: a row committed after the snapshot arrives as a live event.
    len = snprintf(req, sizeof(req), "{\"op\":\"insert\",\"id\":\"after\",\"table\":%s,\"rows\":[{\"id\":-1,\"v\":1}]}\n",
                   tname);
    arm(&w, wfd);
    double sent = now_us();
    write_all(wfd, req, len);
    double arrived = 0, caught_up = 0;  // caught_up: the notice that ends the replay after snapshot_end
    int answered = 0;
    while (!arrived || !answered) {
        // The subscription first (what is timed); the writer's response when it has one.
        if (!arrived) {
            char *nl = memchr(r.buf + r.start, '\n', r.end - r.start);
            if (!nl) {
                struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = wfd, .events = POLLIN}};
                int ready = poll(p, answered ? 1 : 2, 10000);
                if (ready == 0) fail("no insert-rows event within 10 s of the insert after the snapshot");
                if (ready < 0 && errno != EINTR) fail("poll: %s", strerror(errno));
                if (!answered && (p[1].revents & (POLLIN | POLLHUP))) {
                    expect_ok(&w, "the insert after the snapshot");
                    answered = 1;
                }
                if (!(p[0].revents & (POLLIN | POLLHUP))) continue;
            }
            char *line = read_line(&r);
            if (!line) fail("the subscription closed before the insert after the snapshot arrived");
            if (!strncmp(line, "{\"type\":\"event\"", 15)) {
                if (!strstr(line, "\"event\":\"insert-rows\"")) continue;
                arrived = now_us();
                char *n = strstr(line, "\"num_rows\":");
                if (!n || atol(n + 11) != 1) fail("the insert after the snapshot: not one row: %.300s", line);
                continue;
            }
            snapshot_check_line(line, rows, expected);
            if (!caught_up && strstr(line, "\"type\":\"notice\"") && strstr(line, "\"caught_up\"")) caught_up = now_us();
        } else {
            expect_ok(&w, "the insert after the snapshot");
            answered = 1;
        }
    }
    snprintf(sql, sizeof(sql), "delete from %s where id = -1", qtable);
    execute_ok(wfd, &w, sql, "delete");
    printf("{\"table\":%s,\"rows\":%ld,\"pages\":%ld,\"bytes\":%lld,\"start_us\":%.0f,\"first_us\":%.0f,\"end_us\":%.0f,"
           "\"head_seq\":%lld,\"snapshot_seq\":%lld,\"rows_per_s\":%.0f,\"mb_per_s\":%.1f,\"stream_us\":%.0f,"
           "\"caught_up_us\":%.0f}\n",
           tname, rows, pages, bytes, start, first, end, head, end_seq, rows / ((end - start) / 1e6),
           bytes / (end - start), arrived - sent, caught_up ? caught_up - end : -1);
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
        long depth = 1;
        for (int i = 7; i < argc; i++)
            if (!strncmp(argv[i], "DEPTH=", 6)) depth = atol(argv[i] + 6);
        return insert(argv[2], argv[3], atol(argv[4]), atol(argv[5]), depth < 1 ? 1 : depth);
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
    if (argc >= 6 && !strcmp(argv[1], "inserts")) {
        for (int i = 6; i < argc; i++) {
            if (!strncmp(argv[i], "GROUP=", 6)) g_group_commit = atoi(argv[i] + 6) != 0;
            else g_timeout_s = atof(argv[i]);
        }
        return inserts(argv[2], argv[3], atoi(argv[4]), atol(argv[5]));
    }
    if (argc >= 5 && !strcmp(argv[1], "drain")) return drain(argv[2], argv[3], argc - 4, argv + 4);
    if (argc >= 6 && !strcmp(argv[1], "idle")) {
        if (argc >= 7) g_timeout_s = atof(argv[6]);
        return idle(argv[2], atoi(argv[3]), argv[4], argv[5]);
    }
    if (argc >= 5 && !strcmp(argv[1], "stall")) {
        if (argc >= 6) g_timeout_s = atof(argv[5]);
        return stall(argv[2], argv[3], argv[4]);
    }
    if (argc >= 4 && !strcmp(argv[1], "request")) return request(argv[2], argv[3]);
    if (argc >= 5 && !strcmp(argv[1], "snapshot")) {
        if (argc >= 6) g_timeout_s = atof(argv[5]);
        return snapshot(argv[2], argv[3], atol(argv[4]));
    }
    fprintf(stderr, "usage: evdbench pingpong N | client SOCKET N SQL | listener SOCKET EVENT\n"
                    "     | insert SOCKET TABLE TOTAL BATCH [TIMEOUT_S]\n"
                    "     | count SOCKET EVENT EXPECTED READY_FILE [TIMEOUT_S] [SINCE=S] [ROWS=1]\n"
                    "     | exec SOCKET SQL... [TIMEOUT_S=N]\n"
                    "     | inserts SOCKET TABLE CLIENTS TOTAL [TIMEOUT_S] [GROUP=0] | drain SOCKET READY_FILE EVENT...\n"
                    "     | idle SOCKET N READY_FILE EVENT [TIMEOUT_S] | stall SOCKET EVENT READY_FILE [TIMEOUT_S]\n"
                    "     | request SOCKET JSON | snapshot SOCKET TABLE EXPECTED_ROWS [TIMEOUT_S]\n");
    return 2;
}
