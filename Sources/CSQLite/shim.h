#ifndef EVD_CSQLITE_SHIM_H
#define EVD_CSQLITE_SHIM_H

// Debian's libsqlite3 is built with the pre-update hook; the header declares it only when asked.
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

/// SQLITE_TRANSIENT is a cast of -1 to a function pointer, which Swift cannot import.
static inline sqlite3_destructor_type evd_sqlite_transient(void) { return SQLITE_TRANSIENT; }

/// sqlite3_config is variadic and does not import; these wrap the calls evd makes.
static inline int evd_sqlite_config_multithread(void) { return sqlite3_config(SQLITE_CONFIG_MULTITHREAD); }
static inline int evd_sqlite_config_memstatus(int on) { return sqlite3_config(SQLITE_CONFIG_MEMSTATUS, on); }

/// sqlite3_db_config is variadic too: turns the connection's triggers on or off (a prepared
/// transaction's redo log already holds what its triggers did).
static inline int evd_sqlite_enable_triggers(sqlite3 *db, int on) {
    return sqlite3_db_config(db, SQLITE_DBCONFIG_ENABLE_TRIGGER, on, (int *)0);
}

/// Sets one of the connection's on/off options (`SQLITE_DBCONFIG_DEFENSIVE`, ...); 0 on success.
static inline int evd_sqlite_db_config_flag(sqlite3 *db, int option, int on) {
    return sqlite3_db_config(db, option, on, (int *)0);
}

/// A growable byte buffer owned by Swift code (`ChangeCapture.imageBytes`), written by the C below.
typedef struct {
    unsigned char *bytes;
    size_t count;
    size_t capacity;
} evd_bytes;

/// Makes room for `more` bytes; 0 when out of memory.
static inline int evd_bytes_reserve(evd_bytes *b, size_t more) {
    if (b->count + more <= b->capacity) return 1;
    size_t capacity = b->capacity < 4096 ? 4096 : b->capacity;
    while (capacity < b->count + more) capacity *= 2;
    unsigned char *bytes = (unsigned char *)realloc(b->bytes, capacity);
    if (!bytes) return 0;
    b->bytes = bytes;
    b->capacity = capacity;
    return 1;
}

/// Writes `value` as a varint (7 bits a byte, low first) at `at`; returns where it ends.
static inline unsigned char *evd_write_varint(unsigned char *at, unsigned long long value) {
    while (value >= 0x80) {
        *at++ = (unsigned char)(value | 0x80);
        value >>= 7;
    }
    *at++ = (unsigned char)value;
    return at;
}

/// An integer as a row image keeps it: zigzag, so that small negative numbers are short varints.
static inline unsigned long long evd_zigzag(long long value) {
    return ((unsigned long long)value << 1) ^ (unsigned long long)(value >> 63);
}

static inline void evd_bytes_varint(evd_bytes *b, unsigned long long value) {
    b->count = (size_t)(evd_write_varint(b->bytes + b->count, value) - b->bytes);
}

/// Appends the row the pre-update hook sees (its old values when `old`, else its new ones), the
/// first `count` columns, in evd's binary row image (`RowImage` in EventRun.swift, which reads it
/// back): a varint of the count, then each value as a type byte (0 null, 1 integer, 2 real,
/// 3 text, 4 blob) and its bytes (a zigzag varint; 8 bytes little-endian; a varint length and the
/// bytes). `text_is_utf8`: the database keeps text in UTF-8, so its bytes are taken as they are.
/// `reals` (NULL when the table has none): `count` flags, non-zero for a column of REAL affinity,
/// whose integer is written as the real it is (SQLite keeps a whole real as an integer in the
/// record, which is where `sqlite3_preupdate_new` reads an inserted row from).
/// The hot path of change capture, hence in C: one call per row instead of one per value.
/// Returns the bytes appended, or -1 when out of memory (nothing appended).
static inline long evd_append_preupdate_image(
    sqlite3 *db, int count, int old, int text_is_utf8, const unsigned char *reals, evd_bytes *b) {
    size_t start = b->count;
    if (!evd_bytes_reserve(b, 10 + (size_t)count * 10)) return -1;
    evd_bytes_varint(b, (unsigned long long)count);
    for (int column = 0; column < count; column++) {
        sqlite3_value *value = 0;
        int rc = old ? sqlite3_preupdate_old(db, column, &value) : sqlite3_preupdate_new(db, column, &value);
        // Room for a type byte, a 10-byte varint or 8 bytes of a real, before any text's bytes.
        if (!evd_bytes_reserve(b, 11)) { b->count = start; return -1; }
        if (rc != SQLITE_OK || !value) { b->bytes[b->count++] = 0; continue; }
        int type = sqlite3_value_type(value);
        // An integer of a REAL column is the real it reads as (`sqlite3_value_double` converts it).
        if (type == SQLITE_INTEGER && reals && reals[column]) type = SQLITE_FLOAT;
        switch (type) {
        case SQLITE_INTEGER: {
            long long v = sqlite3_value_int64(value);
            b->bytes[b->count++] = 1;
            evd_bytes_varint(b, evd_zigzag(v));
            break;
        }
        case SQLITE_FLOAT: {
            double d = sqlite3_value_double(value);
            unsigned long long bits;
            memcpy(&bits, &d, 8);
            b->bytes[b->count++] = 2;
            for (int i = 0; i < 8; i++) b->bytes[b->count++] = (unsigned char)(bits >> (8 * i));
            break;
        }
        case SQLITE_TEXT:
        case SQLITE_BLOB: {
            int text = type == SQLITE_TEXT;
            const void *data = text && !text_is_utf8 ? (const void *)sqlite3_value_text(value) : sqlite3_value_blob(value);
            size_t n = data ? (size_t)sqlite3_value_bytes(value) : 0;
            b->bytes[b->count++] = text ? 3 : 4;
            evd_bytes_varint(b, n);
            if (n > 0) {
                if (!evd_bytes_reserve(b, n)) { b->count = start; return -1; }
                memcpy(b->bytes + b->count, data, n);
                b->count += n;
            }
            break;
        }
        default:
            b->bytes[b->count++] = 0;
        }
    }
    return (long)(b->count - start);
}

/// CRC-32C (Castagnoli) of `n` bytes at `p`, continuing from `crc` (0 to start): the checksum
/// each journal row carries (`Journal.Checksum`). With SSE 4.2 (x86-64) or the CRC extension
/// (ARMv8) it runs in hardware, 8 bytes an instruction; elsewhere a bit at a time.
#include <stdint.h>
static inline uint32_t evd_crc32c_portable(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return ~crc;
}
#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static inline uint32_t evd_crc32c_sse42(uint32_t crc, const unsigned char *p, size_t n) {
    unsigned long long c = (uint32_t)~crc;
    while (n >= 8) {
        unsigned long long word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}
static inline uint32_t evd_crc32c(uint32_t crc, const void *p, size_t n) {
    static int hardware = -1;
    if (hardware < 0) hardware = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    return hardware ? evd_crc32c_sse42(crc, (const unsigned char *)p, n) : evd_crc32c_portable(crc, (const unsigned char *)p, n);
}
#elif defined(__aarch64__) && defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
static inline uint32_t evd_crc32c(uint32_t crc, const void *bytes, size_t n) {
    const unsigned char *p = (const unsigned char *)bytes;
    crc = ~crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc = __crc32cd(crc, word);
        p += 8;
        n -= 8;
    }
    while (n--) crc = __crc32cb(crc, *p++);
    return ~crc;
}
#else
static inline uint32_t evd_crc32c(uint32_t crc, const void *p, size_t n) {
    return evd_crc32c_portable(crc, (const unsigned char *)p, n);
}
#endif

/// glibc's malloc tuning (its header is not part of the Glibc module); no-ops elsewhere.
/// (`stdlib.h` first: it defines `__GLIBC__`.)
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
/// Gives the heap memory that is free back to the system (glibc keeps it for reuse).
static inline int evd_malloc_trim(void) { return malloc_trim(0); }
/// Serves every allocation of `bytes` or more with its own mapping, returned to the system as soon
/// as it is freed. (A fixed threshold: glibc's own rises to 32 MiB after the first large free, and
/// then keeps such buffers in its arenas, where `malloc_trim` cannot return all of them.)
static inline int evd_malloc_mmap_threshold(int bytes) { return mallopt(M_MMAP_THRESHOLD, bytes); }
/// Keeps up to `bytes` of free memory at the top of a heap instead of giving it back at once
/// (`malloc_trim` still gives it all back).
static inline int evd_malloc_trim_threshold(int bytes) { return mallopt(M_TRIM_THRESHOLD, bytes); }
#else
static inline int evd_malloc_trim(void) { return 0; }
static inline int evd_malloc_mmap_threshold(int bytes) { (void)bytes; return 0; }
static inline int evd_malloc_trim_threshold(int bytes) { (void)bytes; return 0; }
#endif

/// Lowers the calling thread's scheduling priority to `nice` (Linux: a thread is a task of its
/// own); a no-op elsewhere.
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
static inline void evd_lower_thread_priority(int nice) { setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice); }
#else
static inline void evd_lower_thread_priority(int nice) { (void)nice; }
#endif

/// Names the calling thread (what `top -H` and `perf` show); prctl is variadic and does not import.
#ifdef __linux__
#include <sys/prctl.h>
static inline void evd_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
#else
static inline void evd_set_thread_name(const char *name) { (void)name; }
#endif

#endif
