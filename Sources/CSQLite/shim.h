#ifndef EVD_CSQLITE_SHIM_H
#define EVD_CSQLITE_SHIM_H

// Debian's libsqlite3 is built with the pre-update hook; the header declares it only when asked.
#define SQLITE_ENABLE_PREUPDATE_HOOK 1
#include <sqlite3.h>

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
#else
static inline int evd_malloc_trim(void) { return 0; }
static inline int evd_malloc_mmap_threshold(int bytes) { (void)bytes; return 0; }
#endif

/// Names the calling thread (what `top -H` and `perf` show); prctl is variadic and does not import.
#ifdef __linux__
#include <sys/prctl.h>
static inline void evd_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
#else
static inline void evd_set_thread_name(const char *name) { (void)name; }
#endif

#endif
