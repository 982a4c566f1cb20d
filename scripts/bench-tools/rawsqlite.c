// Raw SQLite anchors for scripts/bench: what the bench's inserts cost with no server at all. Every
// connection gets evd's pragmas (journal_mode=WAL, synchronous=NORMAL, foreign_keys=ON,
// busy_timeout=5000) and one prepared INSERT of the bench rows (common.h's bench_row, as columns).
//
//   rawsqlite autocommit DB TABLE THREADS TOTAL [TIMEOUT_S]
//       creates TABLE, then THREADS threads, each with its own connection, insert rows 1..TOTAL between
//       them (thread k: ids k+1, k+1+THREADS, ...), one row per statement in autocommit (each its own
//       transaction, as each evd `insert` request is). They start together; per_sec is TOTAL over the
//       time until the last is done, p50/p99 over every statement.
//   rawsqlite bulk DB TABLE TOTAL BATCH
//       creates TABLE, then inserts rows 1..TOTAL with one connection, BATCH rows per transaction
//       (BEGIN; the prepared INSERT for each row; COMMIT); p50/p99 per transaction.
//   rawsqlite read DB TABLE EXPECTED
//       `select * from TABLE` stepped to its end in one read transaction, each column's value fetched
//       (sqlite3_column_type, then the value as its type); fails unless it returned EXPECTED rows. The
//       anchor for the snapshot row: SQLite's own reading speed, with no JSON and no socket.
//
// Each prints one line of JSON ({"n","p50_us","p99_us","per_sec","version",...}) or {"error":...}.
// The row values are made before timing. Link with -lsqlite3 -lpthread.
#include "common.h"

#include <pthread.h>
#include <sqlite3.h>

// Opens PATH with the busy timeout set first, so that even the first pragma waits for a lock held
// by another connection (as evd's connections do) instead of failing with SQLITE_BUSY.
static sqlite3 *open_db(const char *path) {
    sqlite3 *db;
    if (sqlite3_open(path, &db) != SQLITE_OK) fail("open %s: %s", path, sqlite3_errmsg(db));
    sqlite3_busy_timeout(db, 5000);
    char *err = NULL;
    if (sqlite3_exec(db, "pragma journal_mode = wal; pragma synchronous = normal; pragma foreign_keys = on; "
                         "pragma busy_timeout = 5000;",
                     NULL, NULL, &err) != SQLITE_OK)
        fail("pragmas: %s", err);
    return db;
}

static void exec_or_fail(sqlite3 *db, const char *sql) {
    char *err = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) fail("%s: %s", sql, err);
}

static void create_table(sqlite3 *db, const char *table) {
    char sql[1024];
    snprintf(sql, sizeof(sql), "create table \"%s\" (id integer primary key, name text, score float, tag text)", table);
    exec_or_fail(db, sql);
}

static sqlite3_stmt *prepare_insert(sqlite3 *db, const char *table) {
    char sql[1024];
    snprintf(sql, sizeof(sql), "insert into \"%s\" (id, name, score, tag) values (?, ?, ?, ?)", table);
    sqlite3_stmt *stmt;
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, NULL) != SQLITE_OK)
        fail("prepare: %s", sqlite3_errmsg(db));
    return stmt;
}

// Binds and runs the INSERT of row ID whose name is NAME; returns SQLite's result code.
static int insert_row(sqlite3_stmt *stmt, long id, const char *name) {
    sqlite3_bind_int64(stmt, 1, id);
    sqlite3_bind_text(stmt, 2, name, -1, SQLITE_STATIC);
    sqlite3_bind_double(stmt, 3, bench_score(id));
    sqlite3_bind_text(stmt, 4, bench_tag(id), -1, SQLITE_STATIC);
    int rc = sqlite3_step(stmt);
    sqlite3_reset(stmt);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

// Row names 1..TOTAL, made before timing: names[i] is row i+1's.
static char **make_names(long total) {
    char **names = malloc(sizeof(char *) * total);
    char *all = malloc(24 * total);
    for (long i = 0; i < total; i++) {
        names[i] = all + 24 * i;
        bench_name(names[i], i + 1);
    }
    return names;
}

// ---- autocommit: THREADS connections, one row per transaction ----

typedef struct {
    const char *path, *table;
    int k, threads;
    long total;
    char **names;
    double *lat;
    double end_us;
    pthread_barrier_t *barrier;
    char error[600];
} thread_arg_t;

static void *autocommit_thread(void *varg) {
    thread_arg_t *a = varg;
    sqlite3 *db;
    if (sqlite3_open(a->path, &db) != SQLITE_OK) {
        snprintf(a->error, sizeof(a->error), "open: %s", sqlite3_errmsg(db));
        pthread_barrier_wait(a->barrier);
        return NULL;
    }
    sqlite3_busy_timeout(db, 5000);
    char *err = NULL;
    sqlite3_stmt *stmt = NULL;
    if (sqlite3_exec(db, "pragma synchronous = normal; pragma foreign_keys = on; pragma busy_timeout = 5000;", NULL,
                     NULL, &err) != SQLITE_OK)
        snprintf(a->error, sizeof(a->error), "pragmas: %s", err);
    else {
        char sql[1024];
        snprintf(sql, sizeof(sql), "insert into \"%s\" (id, name, score, tag) values (?, ?, ?, ?)", a->table);
        if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, NULL) != SQLITE_OK)
            snprintf(a->error, sizeof(a->error), "prepare: %s", sqlite3_errmsg(db));
    }
    pthread_barrier_wait(a->barrier);
    if (a->error[0]) return NULL;
    double deadline = now_us() + g_timeout_s * 1e6;
    for (long id = a->k + 1; id <= a->total; id += a->threads) {
        double t = now_us();
        int rc = insert_row(stmt, id, a->names[id - 1]);
        a->lat[id - 1] = now_us() - t;
        if (rc != SQLITE_OK) {
            snprintf(a->error, sizeof(a->error), "insert of row %ld: %s (%s)", id, sqlite3_errstr(rc), sqlite3_errmsg(db));
            break;
        }
        if (now_us() > deadline) {
            snprintf(a->error, sizeof(a->error), "timed out (limit %.0f s)", g_timeout_s);
            break;
        }
    }
    a->end_us = now_us();
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return NULL;
}

static int autocommit(const char *path, const char *table, int threads, long total) {
    sqlite3 *db = open_db(path);
    create_table(db, table);
    sqlite3_close(db);
    char **names = make_names(total);
    double *lat = calloc(total, sizeof(double));
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, threads + 1);
    thread_arg_t *args = calloc(threads, sizeof(thread_arg_t));
    pthread_t *tids = calloc(threads, sizeof(pthread_t));
    for (int k = 0; k < threads; k++) {
        args[k] = (thread_arg_t){.path = path, .table = table, .k = k, .threads = threads, .total = total,
                                 .names = names, .lat = lat, .barrier = &barrier};
        pthread_create(&tids[k], NULL, autocommit_thread, &args[k]);
    }
    pthread_barrier_wait(&barrier);  // every thread has opened and prepared
    double start = now_us(), end = start;
    for (int k = 0; k < threads; k++) {
        pthread_join(tids[k], NULL);
        if (args[k].end_us > end) end = args[k].end_us;
    }
    for (int k = 0; k < threads; k++)
        if (args[k].error[0]) fail("thread %d: %s", k, args[k].error);
    double p50, p99;
    percentiles(lat, total, &p50, &p99);
    printf("{\"threads\":%d,\"n\":%ld,\"p50_us\":%.2f,\"p99_us\":%.2f,\"per_sec\":%.0f,\"version\":\"%s\"}\n", threads,
           total, p50, p99, total / ((end - start) / 1e6), sqlite3_libversion());
    return 0;
}

// ---- bulk: one connection, BATCH rows per transaction ----

static int bulk(const char *path, const char *table, long total, long batch) {
    sqlite3 *db = open_db(path);
    create_table(db, table);
    sqlite3_stmt *stmt = prepare_insert(db, table);
    char **names = make_names(total);
    long nb = (total + batch - 1) / batch;
    double *lat = malloc(sizeof(double) * nb);
    double start = now_us();
    for (long b = 0; b < nb; b++) {
        double t = now_us();
        exec_or_fail(db, "begin");
        long last = (b + 1) * batch < total ? (b + 1) * batch : total;
        for (long id = b * batch + 1; id <= last; id++) {
            int rc = insert_row(stmt, id, names[id - 1]);
            if (rc != SQLITE_OK) fail("insert of row %ld: %s (%s)", id, sqlite3_errstr(rc), sqlite3_errmsg(db));
        }
        exec_or_fail(db, "commit");
        lat[b] = now_us() - t;
    }
    double end = now_us();
    double p50, p99;
    percentiles(lat, nb, &p50, &p99);
    printf("{\"n\":%ld,\"batch\":%ld,\"batches\":%ld,\"p50_us\":%.2f,\"p99_us\":%.2f,\"per_sec\":%.0f,\"version\":\"%s\"}\n",
           total, batch, nb, p50, p99, total / ((end - start) / 1e6), sqlite3_libversion());
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return 0;
}

// ---- read: one SELECT * stepped to its end ----

static int read_table(const char *path, const char *table, long expected) {
    sqlite3 *db = open_db(path);
    char sql[1024];
    snprintf(sql, sizeof(sql), "select * from \"%s\"", table);
    double start = now_us();
    exec_or_fail(db, "begin");
    sqlite3_stmt *stmt;
    if (sqlite3_prepare_v2(db, sql, -1, &stmt, NULL) != SQLITE_OK) fail("prepare: %s", sqlite3_errmsg(db));
    int columns = sqlite3_column_count(stmt);
    long rows = 0;
    long long sum = 0, bytes = 0;  // so that the values are really fetched
    int rc;
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        for (int c = 0; c < columns; c++) {
            switch (sqlite3_column_type(stmt, c)) {
                case SQLITE_INTEGER: sum += sqlite3_column_int64(stmt, c); break;
                case SQLITE_FLOAT: sum += (long long)sqlite3_column_double(stmt, c); break;
                case SQLITE_TEXT: sqlite3_column_text(stmt, c), bytes += sqlite3_column_bytes(stmt, c); break;
                case SQLITE_BLOB: sqlite3_column_blob(stmt, c), bytes += sqlite3_column_bytes(stmt, c); break;
            }
        }
        rows++;
    }
    if (rc != SQLITE_DONE) fail("step: %s", sqlite3_errmsg(db));
    sqlite3_finalize(stmt);
    exec_or_fail(db, "commit");
    double end = now_us();
    if (rows != expected) fail("read %ld rows, not %ld", rows, expected);
    printf("{\"n\":%ld,\"start_us\":%.0f,\"end_us\":%.0f,\"per_sec\":%.0f,\"checksum\":%lld,\"version\":\"%s\"}\n", rows,
           start, end, rows / ((end - start) / 1e6), sum + bytes, sqlite3_libversion());
    sqlite3_close(db);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 6 && !strcmp(argv[1], "autocommit")) {
        if (argc >= 7) g_timeout_s = atof(argv[6]);
        return autocommit(argv[2], argv[3], atoi(argv[4]), atol(argv[5]));
    }
    if (argc >= 6 && !strcmp(argv[1], "bulk")) return bulk(argv[2], argv[3], atol(argv[4]), atol(argv[5]));
    if (argc >= 5 && !strcmp(argv[1], "read")) return read_table(argv[2], argv[3], atol(argv[4]));
    fprintf(stderr, "usage: rawsqlite autocommit DB TABLE THREADS TOTAL [TIMEOUT_S] | bulk DB TABLE TOTAL BATCH\n"
                    "     | read DB TABLE EXPECTED\n");
    return 2;
}
