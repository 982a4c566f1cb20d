"""SQLAlchemy's SQLite dialect on evd: `create_engine("evd:///main")`.

    from sqlalchemy import create_engine

    engine = create_engine("evd:///main")                              # evd's database "main"
    engine = create_engine("evd:///main?socket=/run/evd/evd.sock&token=evd_...")

Registered by the package's entry points as `evd` and `sqlite.evd` (`sqlite+evd:///main`). It is
SQLAlchemy's pysqlite dialect — types, reflection, the compiler and the ORM unchanged — on the
`evd.dbapi` driver instead of `sqlite3`, with what differs:

- Transactions are real ones: the driver runs with `autocommit=False` (PEP 249's), so a
  SQLAlchemy transaction is one evd transaction from its first statement (SELECTs included) to its
  commit or rollback — not pysqlite's "BEGIN only before DML". Isolation levels: SERIALIZABLE (what
  SQLite's transactions are), READ UNCOMMITTED (accepted as pysqlite accepts it, and as without
  effect on a file database) and AUTOCOMMIT.
- Savepoints (`begin_nested()`) and two-phase transactions (`begin_twophase()`, `recover_twophase()`,
  `commit_prepared_twophase()`) are evd's ops; SQLite alone has no two-phase commit.
- The SQLite version is the daemon's (`select sqlite_version()`), not the client's library.
- No Python functions can run inside the daemon: pysqlite's `regexp` (the REGEXP operator) and
  `floor` registrations are not made; `floor` is SQLite's own when the daemon's SQLite has the
  math functions.

URL query arguments: `socket`, `token`, `timeout` (SQLite's busy timeout, seconds),
`socket_timeout` (seconds). `connect_args` reach `evd.dbapi.connect` as they are.
"""

from sqlalchemy import exc, pool
from sqlalchemy import util
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite


def _dbapi_connection(connection):
    """The evd.dbapi.Connection beneath a SQLAlchemy Connection."""
    return connection.connection.dbapi_connection


class EvdDialect(SQLiteDialect_pysqlite):
    driver = "evd"
    supports_statement_cache = True
    supports_server_side_cursors = False

    @classmethod
    def import_dbapi(cls):
        from evd import dbapi

        return dbapi

    @classmethod
    def get_pool_class(cls, url):
        return pool.QueuePool  # every connection is a socket to the daemon, never an in-process file

    def create_connect_args(self, url):
        if url.username or url.password or url.host or url.port:
            raise exc.ArgumentError(
                "Invalid evd URL: %s\nValid forms: evd:///DATABASE (one of evd's databases, e.g. main), "
                "evd:// (the daemon's first), with ?socket=PATH&token=TOKEN&timeout=SECONDS" % (url,)
            )
        known = {"socket": str, "token": str, "timeout": float, "socket_timeout": float}
        opts = dict(url.query)
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise exc.ArgumentError("Unknown evd URL argument(s): %s (known: %s)" % (", ".join(unknown), ", ".join(known)))
        kwargs = {"database": url.database or None, "autocommit": False}
        for key, kind in known.items():
            # Not util.coerce_kw_type: it copies to dest only the values it converts, so a str
            # argument (socket, token) would never reach the driver.
            if opts.get(key) is not None:
                kwargs[key] = kind(opts[key])
        return [], kwargs

    def _sqlite_main_query(self, table, type_, schema, sqlite_include_internal):
        # evd's own tables (_evd_journal, _evd_meta, _evd_twophase) are the daemon's, as sqlite_*
        # are SQLite's: reflection leaves them out unless asked for internal tables too.
        query = super()._sqlite_main_query(table, type_, schema, sqlite_include_internal)
        if sqlite_include_internal:
            return query
        return query.replace(" ORDER BY name", " AND name NOT LIKE '~_evd~_%' ESCAPE '~' ORDER BY name")

    def on_connect(self):
        return None  # no regexp/floor: Python functions cannot run in the daemon

    def _get_server_version_info(self, connection):
        if connection is None:
            return self.dbapi.sqlite_version_info
        version = connection.exec_driver_sql("select sqlite_version()").scalar()
        return tuple(int(part) for part in version.split(".") if part.isdigit())

    def initialize(self, connection):
        super().initialize(connection)
        if self.server_version_info < (3, 35):
            self.update_returning = self.delete_returning = self.insert_returning = False
        if self.server_version_info < (3, 32, 0):
            self.insertmanyvalues_max_parameters = 999

    # -- isolation ------------------------------------------------------------------------------
    # SQLite's transactions are SERIALIZABLE. READ UNCOMMITTED is accepted as pysqlite accepts it
    # (PRAGMA read_uncommitted, which only acts on shared-cache connections: never on a file
    # database, so it changes nothing there either); the driver remembers it. AUTOCOMMIT is the
    # driver's autocommit.

    _isolation_lookup = util.immutabledict({"READ UNCOMMITTED": 1, "SERIALIZABLE": 0, "AUTOCOMMIT": None})

    def get_isolation_level_values(self, dbapi_connection):
        return list(self._isolation_lookup)

    def set_isolation_level(self, dbapi_connection, level):
        if level not in self._isolation_lookup:
            raise exc.ArgumentError(
                "Invalid value %r for isolation_level. Valid isolation levels for %s are %s"
                % (level, self.name, ", ".join(self._isolation_lookup))
            )
        dbapi_connection.autocommit = level == "AUTOCOMMIT"
        if level != "AUTOCOMMIT":
            dbapi_connection.sqlalchemy_isolation_level = level

    def get_isolation_level(self, dbapi_connection):
        if dbapi_connection.autocommit is True:
            return "AUTOCOMMIT"
        return getattr(dbapi_connection, "sqlalchemy_isolation_level", "SERIALIZABLE")

    def detect_autocommit_setting(self, dbapi_conn):
        return dbapi_conn.autocommit is True

    # -- savepoints and two-phase transactions: evd's ops -----------------------------------------

    def do_savepoint(self, connection, name):
        _dbapi_connection(connection).savepoint(name)

    def do_rollback_to_savepoint(self, connection, name):
        _dbapi_connection(connection).rollback_to_savepoint(name)

    def do_release_savepoint(self, connection, name):
        _dbapi_connection(connection).release_savepoint(name)

    def do_begin_twophase(self, connection, xid):
        _dbapi_connection(connection).tpc_begin(xid)

    def do_prepare_twophase(self, connection, xid):
        _dbapi_connection(connection).tpc_prepare()

    def do_rollback_twophase(self, connection, xid, is_prepared=True, recover=False):
        _dbapi_connection(connection).tpc_rollback(xid)

    def do_commit_twophase(self, connection, xid, is_prepared=True, recover=False):
        _dbapi_connection(connection).tpc_commit(xid)

    def do_recover_twophase(self, connection):
        return _dbapi_connection(connection).tpc_recover()

    def is_disconnect(self, e, connection, cursor):
        dbapi = self.dbapi
        if not isinstance(e, dbapi.Error):
            return False
        return e.code in dbapi.DISCONNECT_CODES or "Cannot operate on a closed database." in str(e)


dialect = EvdDialect
