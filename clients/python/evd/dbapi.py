"""evd.dbapi: a PEP 249 (DB-API 2.0) driver for evd, Python's standard library only.

It behaves like Python's own `sqlite3` module, so that code written for `sqlite3.connect(...)`
runs on evd by changing that one line, and every statement goes through evd's events, vetoes and
permissions:

    from evd import dbapi

    conn = dbapi.connect("main")                       # evd's database "main", on the default socket
    conn.execute("create table if not exists dogs(id integer primary key, name text)")
    with conn:                                         # commits, or rolls back on an exception
        conn.execute("insert into dogs(name) values (?)", ("Rex",))
    print(conn.execute("select id, name from dogs where name = :n", {"n": "Rex"}).fetchall())

What differs from `sqlite3`, and why, is in clients/python/README.md. In short:

- `connect(database=None, *, socket=None, token=None, timeout=None, autocommit=..., isolation_level="")`:
  `database` is the name of one of evd's databases (not a file), `socket` is resolved as every
  evd client resolves it, `token` logs in with a token (`create_token`; else $EVD_TOKEN),
  `timeout` is SQLite's busy timeout in seconds (the daemon's setting when None).
- Transactions are `sqlite3`'s: with the default `autocommit=LEGACY_TRANSACTION_CONTROL` a
  transaction begins implicitly before INSERT, UPDATE, DELETE and REPLACE (unless
  `isolation_level` is None); `autocommit=False` is PEP 249's always-open transaction (begun
  lazily, at the first statement, so an idle connection holds none of evd's pooled connections;
  ATTACH, DETACH and VACUUM, which SQLite refuses inside a transaction, do not begin one);
  `autocommit=True` runs each statement in its own transaction. `BEGIN`, `COMMIT`, `ROLLBACK`,
  `SAVEPOINT`, `RELEASE` and `ROLLBACK TO` sent as SQL become evd's transaction ops.
- Errors are the PEP 249 classes chosen, as `sqlite3` chooses them, by the SQLite result code evd
  reports (`IntegrityError` for `SQLITE_CONSTRAINT_*`); each carries evd's error `code`,
  `sqlite_errorname` (`SQLITE_CONSTRAINT_UNIQUE`) and `sqlite_errorcode`, and a statement a
  listener denied raises `Vetoed` (an `OperationalError`) with its `event`, `by` and `reason`.
- Values round-trip exactly: INTEGER as int, REAL as float (±inf included), TEXT as str (TEXT that
  is not valid UTF-8 as a str with lone surrogates, as `os.fsdecode` gives), BLOB as bytes.
- Two-phase commit (PEP 249's optional `tpc_*` API) and savepoints map to evd's ops.
"""

import datetime
import os
import re
import sqlite3 as _sqlite3
import time

from . import Client, ConnectionClosed, EvdError, decode_value, encode_value

__all__ = [
    "apilevel", "threadsafety", "paramstyle", "connect", "Connection", "Cursor",
    "Warning", "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError",
    "IntegrityError", "InternalError", "ProgrammingError", "NotSupportedError", "Vetoed",
    "PermissionDenied", "Binary", "Date", "Time", "Timestamp", "DateFromTicks", "TimeFromTicks",
    "TimestampFromTicks", "STRING", "BINARY", "NUMBER", "DATETIME", "ROWID",
    "LEGACY_TRANSACTION_CONTROL", "register_adapter", "complete_statement",
]

apilevel = "2.0"
threadsafety = 1  # threads may share the module, not a connection (one socket, one session)
paramstyle = "qmark"  # and "named": a mapping binds :name, @name and $name, as in sqlite3

LEGACY_TRANSACTION_CONTROL = -1  # sqlite3.LEGACY_TRANSACTION_CONTROL (Python 3.12)

# The SQLite library evd links is the system's, as Python's sqlite3 normally is: the SQLAlchemy
# dialect checks the daemon's own (select sqlite_version()) when it connects.
sqlite_version = _sqlite3.sqlite_version
sqlite_version_info = _sqlite3.sqlite_version_info

# A request's line must stay under the daemon's --max-line-bytes (1 MiB by default): executemany
# sends its parameter sets in requests of at most this many bytes of JSON.
EXECUTEMANY_REQUEST_BYTES = 512 * 1024


# -- exceptions (PEP 249) ------------------------------------------------------------------------


class Warning(Exception):  # noqa: A001 - the name PEP 249 requires
    pass


class Error(Exception):
    """Every error the driver raises. From an evd error response: `code` (evd's: "sql_error",
    "vetoed", ...), `sqlite_errorname` and `sqlite_errorcode` (as sqlite3's), and `extra` (the error
    object's other fields: `event`, `by`, `reason`, `field`, ...)."""

    def __init__(self, message="", code=None, extra=None):
        super().__init__(message)
        self.code = code
        self.extra = dict(extra or {})
        self.sqlite_errorname = self.extra.get("sqlite_code")
        self.sqlite_errorcode = _sqlite_code_number(self.sqlite_errorname)

    @property
    def event(self):
        return self.extra.get("event")

    @property
    def by(self):
        return self.extra.get("by")

    @property
    def reason(self):
        return self.extra.get("reason")

    @property
    def field(self):
        return self.extra.get("field")


class InterfaceError(Error):
    pass


class DatabaseError(Error):
    pass


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    pass


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


class Vetoed(OperationalError):
    """A listener denied the work (evd's `vetoed`): `event` is the event it denied, `by` the
    listener's subscription name, `reason` its reason. The message names all three."""


class PermissionDenied(OperationalError):
    """evd's `permission_denied`: the actor (the connecting uid, or the token's) lacks an action."""


def _sqlite_code_number(name):
    if not name:
        return None
    number = getattr(_sqlite3, name, None)
    return number if isinstance(number, int) else None


# The class for a SQLite result code, as sqlite3 chooses it (Modules/_sqlite/util.c).
_BY_SQLITE_PRIMARY = {
    "SQLITE_INTERNAL": InternalError, "SQLITE_NOTFOUND": InternalError,
    "SQLITE_ERROR": OperationalError, "SQLITE_PERM": OperationalError, "SQLITE_ABORT": OperationalError,
    "SQLITE_BUSY": OperationalError, "SQLITE_LOCKED": OperationalError, "SQLITE_READONLY": OperationalError,
    "SQLITE_INTERRUPT": OperationalError, "SQLITE_IOERR": OperationalError, "SQLITE_FULL": OperationalError,
    "SQLITE_CANTOPEN": OperationalError, "SQLITE_PROTOCOL": OperationalError, "SQLITE_EMPTY": OperationalError,
    "SQLITE_SCHEMA": OperationalError, "SQLITE_NOMEM": OperationalError,
    "SQLITE_CORRUPT": DatabaseError, "SQLITE_NOTADB": DatabaseError,
    "SQLITE_TOOBIG": DataError,
    "SQLITE_CONSTRAINT": IntegrityError, "SQLITE_MISMATCH": IntegrityError,
    "SQLITE_MISUSE": InterfaceError, "SQLITE_RANGE": InterfaceError,
}

# The class for an evd error code that is not a SQLite error.
_BY_EVD_CODE = {
    "vetoed": Vetoed, "permission_denied": PermissionDenied,
    "bad_request": ProgrammingError, "unknown_op": InterfaceError, "bad_json": InterfaceError,
    "line_too_long": DataError, "response_too_large": OperationalError,
    "not_in_transaction": OperationalError, "already_in_transaction": OperationalError,
    "no_such_database": OperationalError, "no_such_table": OperationalError, "no_such_row": DataError,
    "timeout": OperationalError, "busy": OperationalError, "too_many_connections": OperationalError,
    "shutting_down": OperationalError, "connection_closed": OperationalError,
    "token_invalid": OperationalError, "token_expired": OperationalError,
    "internal_error": InternalError,
}

# evd codes after which this connection is gone (SQLAlchemy's dialect: is_disconnect).
DISCONNECT_CODES = frozenset({"connection_closed", "shutting_down"})


def _error_class(code, sqlite_name):
    if code in ("sql_error", "busy") and sqlite_name:
        primary = "_".join(sqlite_name.split("_")[:2])
        return _BY_SQLITE_PRIMARY.get(primary, DatabaseError)
    return _BY_EVD_CODE.get(code, DatabaseError)


def _translate(error):
    """An evd.EvdError as the PEP 249 exception for it."""
    extra = dict(error.extra)
    message = error.message or error.code
    cls = _error_class(error.code, extra.get("sqlite_code"))
    if cls is Vetoed and extra.get("event") and extra.get("event") not in message:
        message = "%s (event %s)" % (message, extra["event"])
    if error.code == "response_too_large":
        message += " (evd's --max-response-bytes: read the result in parts, with LIMIT and OFFSET)"
    return cls(message, code=error.code, extra=extra)


# -- types and constructors (PEP 249) --------------------------------------------------------------

Binary = bytes
Date = datetime.date
Time = datetime.time
Timestamp = datetime.datetime


def DateFromTicks(ticks):
    return Date(*time.localtime(ticks)[:3])


def TimeFromTicks(ticks):
    return Time(*time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks):
    return Timestamp(*time.localtime(ticks)[:6])


class _TypeObject(frozenset):
    """A PEP 249 type object: equal to each type code it stands for."""

    def __eq__(self, other):
        if isinstance(other, _TypeObject):
            return frozenset.__eq__(self, other)
        return other in self

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = frozenset.__hash__


# A column's type code in `description` is the SQLite storage class of its values in the result
# ("TEXT", "INTEGER", "REAL", "BLOB"), or None when the result has no value for it but NULL (evd
# returns values, not declared types).
STRING = _TypeObject({"TEXT"})
BINARY = _TypeObject({"BLOB"})
NUMBER = _TypeObject({"INTEGER", "REAL"})
DATETIME = _TypeObject()  # SQLite has no date type: dates are TEXT, REAL or INTEGER
ROWID = _TypeObject({"INTEGER"})

_INT64 = (-(1 << 63), (1 << 63) - 1)

# Adapters, as sqlite3's register_adapter: type -> callable returning an int, float, str, bytes or None.
_adapters = {}


def register_adapter(type_, adapter):
    """Binds values of `type_` as adapter(value) returns them, as sqlite3.register_adapter."""
    _adapters[type_] = adapter


# sqlite3's default adapters (deprecated there in 3.12, kept here for code that relies on them).
register_adapter(datetime.date, lambda value: value.isoformat())
register_adapter(datetime.datetime, lambda value: value.isoformat(" "))


def _bind(value, index):
    """One parameter as evd's JSON form (docs/protocol.md, "Values")."""
    if value is None or isinstance(value, str):
        return encode_value(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return value
    if isinstance(value, float):
        return None if value != value else encode_value(value)  # SQLite stores NaN as NULL
    if isinstance(value, (bytes, bytearray, memoryview)):
        return encode_value(value)
    adapter = _adapters.get(type(value))
    if adapter is not None:
        return _bind(adapter(value), index)
    conform = getattr(value, "__conform__", None)
    if conform is not None:
        adapted = conform(_sqlite3.PrepareProtocol)
        if adapted is not None:
            return _bind(adapted, index)
    raise ProgrammingError("Error binding parameter %s: type '%s' is not supported" % (index, type(value).__name__))


def _bind_parameters(parameters):
    if parameters is None:
        return []
    if isinstance(parameters, dict) or (hasattr(parameters, "keys") and hasattr(parameters, "__getitem__")):
        return {str(key): _bind(parameters[key], ":" + str(key)) for key in parameters.keys()}
    if isinstance(parameters, (str, bytes)):
        raise ProgrammingError("parameters are of unsupported type: pass a sequence or a mapping")
    try:
        return [_bind(value, index + 1) for index, value in enumerate(parameters)]
    except TypeError as error:
        raise ProgrammingError("parameters are of unsupported type: %s" % error) from None


# -- statements ---------------------------------------------------------------------------------

_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.S)
_WORD = re.compile(r"[A-Za-z]+")
_DML = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})
# Statements SQLite refuses inside a transaction: they never begin the implicit one.
_OUTSIDE_TRANSACTION = frozenset({"ATTACH", "DETACH", "VACUUM"})
_NAME = r'(?:"(?:[^"]|"")+"|\[[^\]]+\]|`(?:[^`]|``)+`|\'(?:[^\']|\'\')+\'|[^\s;]+)'
_CONTROL = [
    ("begin", re.compile(r"BEGIN(?:\s+(?:DEFERRED|IMMEDIATE|EXCLUSIVE))?(?:\s+TRANSACTION)?\s*;?\s*\Z", re.I)),
    ("commit", re.compile(r"(?:COMMIT|END)(?:\s+TRANSACTION)?\s*;?\s*\Z", re.I)),
    ("rollback_to", re.compile(r"ROLLBACK(?:\s+TRANSACTION)?\s+TO(?:\s+SAVEPOINT)?\s+(" + _NAME + r")\s*;?\s*\Z", re.I)),
    ("rollback", re.compile(r"ROLLBACK(?:\s+TRANSACTION)?\s*;?\s*\Z", re.I)),
    ("savepoint", re.compile(r"SAVEPOINT\s+(" + _NAME + r")\s*;?\s*\Z", re.I)),
    ("release", re.compile(r"RELEASE(?:\s+SAVEPOINT)?\s+(" + _NAME + r")\s*;?\s*\Z", re.I)),
]
_CONTROL_WORDS = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"})


def complete_statement(sql):
    """sqlite3.complete_statement: whether `sql` ends a complete statement."""
    return _sqlite3.complete_statement(sql)


def _body(sql):
    """`sql` without its leading blanks and comments."""
    return sql[_LEADING.match(sql).end():]


def _first_word(sql):
    match = _WORD.match(_body(sql))
    return match.group(0).upper() if match else ""


def _unquote(name):
    if name[:1] in "\"`'" and name[-1:] == name[:1]:
        return name[1:-1].replace(name[0] * 2, name[0])
    if name[:1] == "[" and name[-1:] == "]":
        return name[1:-1]
    return name


def _split(sql):
    """`sql`'s statements (sqlite3's rule: a statement ends at a ';' after which the text is complete;
    blank and comment-only remainders are no statement)."""
    statements = []
    rest = sql
    while _body(rest):
        end = -1
        position = rest.find(";")
        while position >= 0:
            if _sqlite3.complete_statement(rest[:position + 1]):
                end = position + 1
                break
            position = rest.find(";", position + 1)
        if end < 0:
            statements.append(rest)
            break
        statements.append(rest[:end])
        rest = rest[end:]
    return statements


# -- connections ----------------------------------------------------------------------------------


def connect(database=None, *, socket=None, token=None, timeout=None, autocommit=LEGACY_TRANSACTION_CONTROL,
            isolation_level="", socket_timeout=None, factory=None, check_same_thread=True, detect_types=0,
            cached_statements=128, uri=False):
    """A connection to evd's database `database` (None: the daemon's first).

    `socket`: the socket path (else $EVD_SOCKET, ... as every evd client resolves it).
    `token`: a token to log in with (else $EVD_TOKEN when set, as evd's command-line tools; else the
    connecting process's uid decides).
    `timeout`: seconds a statement waits for another writer's lock (SQLite's busy timeout,
    sqlite3's `timeout`); None keeps the daemon's.
    `autocommit`, `isolation_level`: as sqlite3's (Python 3.12).
    `socket_timeout`: seconds any one exchange with the daemon may take (None: no limit).
    sqlite3's other arguments (`check_same_thread`, `detect_types`, `cached_statements`, `uri`) are
    accepted and ignored: evd prepares and caches statements itself, and converts no declared types;
    any other argument is a TypeError, as in sqlite3."""
    if detect_types:
        raise NotSupportedError("detect_types: evd returns values, not declared types; convert them yourself")
    cls = factory or Connection
    return cls(database, socket=socket, token=token, timeout=timeout, autocommit=autocommit,
               isolation_level=isolation_level, socket_timeout=socket_timeout)


class Connection:
    """One session with evd (one socket). Not for use by two threads at once."""

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(self, database=None, *, socket=None, token=None, timeout=None,
                 autocommit=LEGACY_TRANSACTION_CONTROL, isolation_level="", socket_timeout=None):
        self.database = database
        self.row_factory = None
        self.text_factory = str
        self._client = None
        self._closed = False           # close() was called
        self._read_only = False        # the open transaction has run SELECTs only
        self._deferred = []            # ids of rollbacks sent whose answers are not read yet
        self._in_transaction = False   # evd holds a transaction for this session
        self._opened_by = None         # the savepoint whose SAVEPOINT began the transaction
        self._prepared = None          # the xid prepared by tpc_prepare, until decided
        self._tpc_xid = None           # the xid of tpc_begin's transaction
        self._check_isolation_level(isolation_level)
        self._isolation_level = isolation_level
        self._check_autocommit(autocommit)
        self._autocommit = autocommit
        try:
            self._client = Client(socket, timeout=socket_timeout)
        except EvdError as error:
            raise OperationalError("cannot connect to evd: %s" % error.message, code=error.code) from None
        if token is None:
            token = os.environ.get("EVD_TOKEN") or None  # as evd's command-line tools
        try:
            if token is not None:
                self._request("login", token=token)
            if timeout is not None:
                self._request("execution_options", options={"busy_timeout_ms": int(float(timeout) * 1000)})
            if database is not None:
                self.database = database
            else:
                names = self._client.hello.get("databases") or []
                self.database = names[0] if names else None
        except Error:
            self._client.close()
            raise

    # -- the session --------------------------------------------------------------------------

    @property
    def client(self):
        """The evd.Client beneath (for events, vetoes and evd's other ops on this session)."""
        self._check_open()
        return self._client

    @property
    def closed(self):
        return self._client is None or self._client.closed

    def _check_open(self):
        if self._client is None or self._client.closed:
            raise ProgrammingError("Cannot operate on a closed database.", code="connection_closed")

    def _request(self, op, **args):
        return self._result(self._submit(op, **args))

    def _submit(self, op, **args):
        """Sends a request without waiting for its answer (_result waits)."""
        self._check_open()
        try:
            return self._client.submit(op, **args)
        except ConnectionClosed as error:
            self._lost(error)

    def _result(self, request_id):
        try:
            return self._client.result(request_id)
        except ConnectionClosed as error:
            self._lost(error)
        except EvdError as error:
            raise _translate(error) from None
        finally:
            self._collect_deferred()

    def _lost(self, error):
        self._in_transaction = False
        self._deferred.clear()
        raise OperationalError("the connection to evd is closed: %s" % error.message,
                               code="connection_closed") from None

    def _collect_deferred(self):
        """Takes the answers of deferred rollbacks that have arrived. A rollback cannot fail in a way
        that leaves work to do (not_in_transaction means SQLite ended the transaction itself)."""
        while self._deferred and self._client.answered(self._deferred[0]):
            try:
                self._client.result(self._deferred.pop(0))
            except EvdError:
                pass

    def close(self):
        """Closes the session; evd rolls back a transaction still open. Closing it a second time
        is an Error, as PEP 249 has it (closing one whose connection was lost is not)."""
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed database.", code="connection_closed")
        self._closed = True
        if self._client is not None:
            self._client.close()
        self._in_transaction = False

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.commit()
        else:
            self.rollback()
        return False

    def __del__(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    # -- transactions -------------------------------------------------------------------------

    @property
    def in_transaction(self):
        return self._in_transaction

    @staticmethod
    def _check_autocommit(value):
        if not (value is True or value is False or (type(value) is int and value == LEGACY_TRANSACTION_CONTROL)):
            raise ValueError("autocommit must be True, False, or LEGACY_TRANSACTION_CONTROL")

    @staticmethod
    def _check_isolation_level(value):
        if value is not None and (not isinstance(value, str)
                                  or value.upper() not in ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")):
            raise ValueError("isolation_level must be None, '', 'DEFERRED', 'IMMEDIATE' or 'EXCLUSIVE'")

    @property
    def autocommit(self):
        """sqlite3's (Python 3.12): LEGACY_TRANSACTION_CONTROL (implicit BEGIN before DML), True
        (each statement its own transaction) or False (always in a transaction, PEP 249's way).
        Setting True commits an open transaction; setting False from True begins one (lazily)."""
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value):
        self._check_autocommit(value)
        self._check_open()
        if value is True and self._in_transaction:
            self._commit()
        self._autocommit = value

    @property
    def isolation_level(self):
        """sqlite3's: "" (DEFERRED), "IMMEDIATE", "EXCLUSIVE" or None (autocommit); only in legacy mode.
        evd begins every transaction as SQLite's deferred BEGIN (its `begin` op)."""
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value):
        self._check_isolation_level(value)
        if value is None and self._in_transaction and self._autocommit == LEGACY_TRANSACTION_CONTROL:
            self._commit()
        self._isolation_level = value

    def _begin(self):
        self._request("begin", database=self.database)
        self._began()

    def _began(self):
        self._in_transaction = True
        self._opened_by = None
        self._read_only = True

    def _before_statement(self, word):
        """Begins the implicit transaction a statement whose first word is `word` needs, as sqlite3
        does. Returns the id
        of a `begin` sent ahead of a SELECT without waiting (the statement follows it at once:
        _after_statement reads its answer), else None.

        Only a SELECT follows its begin unawaited: should the begin fail, evd runs the statement
        alone, which changes nothing for a read (its rows are then not used), where a write would
        commit outside the transaction its caller asked for. A read transaction thus costs one
        round trip for its first statement, and its rollback none (see rollback())."""
        if self._in_transaction or self._prepared is not None:
            if word != "SELECT":
                self._read_only = False
            return None
        if word in _OUTSIDE_TRANSACTION:
            return None
        if self._autocommit is False:
            if word == "SELECT":
                return self._submit("begin", database=self.database)
            self._begin()
            self._read_only = False
        elif (self._autocommit == LEGACY_TRANSACTION_CONTROL and self._isolation_level is not None
              and word in _DML):
            self._begin()
            self._read_only = False
        return None

    def _after_statement(self, begin_id):
        """The answer of a begin _before_statement sent ahead: raises its error (the statement ran
        alone, a read: its result is dropped)."""
        if begin_id is not None:
            self._result(begin_id)
            self._began()

    def _commit(self):
        try:
            self._request("commit", database=self.database)
        except Error as error:
            if error.code == "not_in_transaction":   # SQLite ended it already (the error said so)
                pass
            elif error.code == "vetoed":              # a denied commit rolls back
                self._in_transaction = False
                self._opened_by = None
                raise
            else:
                raise                                  # busy: still open, retry or roll back
        self._in_transaction = False
        self._opened_by = None

    def commit(self):
        self._check_open()
        if self._tpc_xid is not None:
            raise ProgrammingError("commit() inside a two-phase transaction: use tpc_commit()")
        if self._in_transaction:
            self._commit()

    def rollback(self):
        self._check_open()
        if self._tpc_xid is not None:
            raise ProgrammingError("rollback() inside a two-phase transaction: use tpc_rollback()")
        if self._in_transaction:
            if self._read_only:
                # Nothing to undo: the answer is read with the next request's (answers come in
                # order), so ending a read transaction costs no round trip.
                self._deferred.append(self._submit("rollback", database=self.database))
            else:
                try:
                    self._request("rollback", database=self.database)
                except Error as error:
                    if error.code != "not_in_transaction":
                        raise
            self._in_transaction = False
            self._opened_by = None

    # Savepoints (what SAVEPOINT, RELEASE and ROLLBACK TO sent as SQL do). As in SQLite, a
    # SAVEPOINT outside a transaction begins one, and releasing that savepoint commits it.

    def savepoint(self, name):
        self._check_open()
        opens = not self._in_transaction
        if opens:
            self._begin()
        self._read_only = False
        try:
            self._request("savepoint", name=name)
        except Error:
            if opens:
                self.rollback()
            raise
        if opens:
            self._opened_by = name

    def release_savepoint(self, name):
        self._check_open()
        if not self._in_transaction:
            raise OperationalError("no such savepoint: %s" % name, code="not_in_transaction")
        self._request("release_savepoint", name=name)
        if self._opened_by == name:
            self._commit()

    def rollback_to_savepoint(self, name):
        self._check_open()
        if not self._in_transaction:
            raise OperationalError("no such savepoint: %s" % name, code="not_in_transaction")
        self._request("rollback_savepoint", name=name)

    def _control(self, kind, name):
        """A transaction statement sent as SQL, as evd's op."""
        if kind == "begin":
            if self._in_transaction:
                raise OperationalError("cannot start a transaction within a transaction",
                                       code="already_in_transaction")
            self._begin()
        elif kind == "commit":
            if not self._in_transaction:
                raise OperationalError("cannot commit - no transaction is active", code="not_in_transaction")
            self._commit()
        elif kind == "rollback":
            if not self._in_transaction:
                raise OperationalError("cannot rollback - no transaction is active", code="not_in_transaction")
            self.rollback()
        elif kind == "savepoint":
            self.savepoint(_unquote(name))
        elif kind == "release":
            self.release_savepoint(_unquote(name))
        elif kind == "rollback_to":
            self.rollback_to_savepoint(_unquote(name))

    # Two-phase commit (PEP 249's optional extension), on evd's ops. An xid is a string, or
    # PEP 249's (format_id, global_transaction_id, branch_qualifier) from xid().

    def xid(self, format_id, global_transaction_id, branch_qualifier):
        return (format_id, global_transaction_id, branch_qualifier)

    @staticmethod
    def _xid_text(xid):
        if isinstance(xid, str):
            return xid
        if isinstance(xid, tuple) and len(xid) == 3:
            return "%d:%s:%s" % (int(xid[0]), xid[1], xid[2])
        raise ProgrammingError("an xid is a string or (format_id, global_transaction_id, branch_qualifier)")

    def tpc_begin(self, xid):
        self._check_open()
        if self._in_transaction or self._tpc_xid is not None:
            raise ProgrammingError("tpc_begin() inside a transaction")
        self._request("begin_twophase", xid=self._xid_text(xid), database=self.database)
        self._tpc_xid = xid
        self._in_transaction = True

    def tpc_prepare(self):
        self._check_open()
        if self._tpc_xid is None:
            raise ProgrammingError("tpc_prepare() outside a two-phase transaction")
        self._request("prepare_twophase", xid=self._xid_text(self._tpc_xid), database=self.database)
        self._prepared = self._tpc_xid
        self._in_transaction = False

    def _tpc_end(self, op, xid):
        self._check_open()
        if xid is None:
            if self._tpc_xid is None:
                raise ProgrammingError("%s without an xid outside a two-phase transaction" % op)
            xid = self._tpc_xid
        elif self._tpc_xid is not None and xid != self._tpc_xid:
            raise ProgrammingError("%s of another xid inside a two-phase transaction" % op)
        self._request(op, xid=self._xid_text(xid), database=self.database)
        if xid == self._tpc_xid:
            self._tpc_xid = None
            self._prepared = None
            self._in_transaction = False

    def tpc_commit(self, xid=None):
        """Commits the prepared transaction `xid` (this one's when None; in one phase when it was
        not prepared)."""
        self._tpc_end("commit_twophase", xid)

    def tpc_rollback(self, xid=None):
        self._tpc_end("rollback_twophase", xid)

    def tpc_recover(self):
        """The xids of prepared transactions awaiting a decision."""
        return list(self._request("recover", database=self.database).get("xids", []))

    # -- shortcuts, as sqlite3's ----------------------------------------------------------------

    def cursor(self, factory=None):
        self._check_open()
        return (factory or Cursor)(self)

    def execute(self, sql, parameters=()):
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql, seq_of_parameters):
        return self.cursor().executemany(sql, seq_of_parameters)

    def executescript(self, sql_script):
        return self.cursor().executescript(sql_script)


# -- cursors --------------------------------------------------------------------------------------


def _storage_class(value):
    if isinstance(value, bool) or isinstance(value, int):
        return "INTEGER"
    if isinstance(value, float):
        return "REAL"
    if isinstance(value, str):
        return "TEXT"
    if isinstance(value, bytes):
        return "BLOB"
    return None


class Cursor:
    """A cursor: the result of its last execute, fetched from memory (evd answers a statement with
    all of its rows)."""

    def __init__(self, connection):
        self.connection = connection
        self.arraysize = 1
        self.description = None
        self.rowcount = -1
        self.lastrowid = None
        self.row_factory = connection.row_factory
        self._rows = None
        self._position = 0
        self._closed = False

    def _check(self):
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed cursor.")
        self.connection._check_open()

    def close(self):
        self._closed = True
        self._rows = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def setinputsizes(self, sizes):
        pass  # SQLite has no input sizes

    def setoutputsize(self, size, column=None):
        pass  # every value comes whole

    def _reset(self):
        self.description = None
        self.rowcount = -1
        self._rows = None
        self._position = 0

    def execute(self, sql, parameters=()):
        """Runs one statement (more than one is ProgrammingError, as in sqlite3: executescript runs
        several)."""
        self._check()
        if not isinstance(sql, str):
            raise TypeError("execute() argument 1 must be str, not %s" % type(sql).__name__)
        self._reset()
        if ";" in sql and len(_split(sql)) > 1:
            raise ProgrammingError("You can only execute one statement at a time.")
        params = _bind_parameters(parameters)
        connection = self.connection
        word = _first_word(sql)
        if word in _CONTROL_WORDS:
            body = _body(sql)
            for kind, pattern in _CONTROL:
                match = pattern.match(body)
                if match:
                    if params:
                        raise ProgrammingError("a transaction statement takes no parameters")
                    connection._control(kind, match.group(1) if match.groups() else None)
                    return self
        begin_id = connection._before_statement(word)
        try:
            result = connection._request("execute", sql=sql, params=params, database=connection.database)
        finally:
            connection._after_statement(begin_id)
        self._take(result, word)
        last = result.get("last_insert_rowid")
        if last is not None:
            self.lastrowid = last
        return self

    def _take(self, result, word):
        columns = result.get("columns") or []
        rows = result.get("rows") or []
        if any(type(value) is dict for row in rows for value in row):
            rows = [tuple(decode_value(value) for value in row) for row in rows]
        else:
            rows = [tuple(row) for row in rows]
        if columns:
            types = [None] * len(columns)
            for row in rows:
                for index, value in enumerate(row):
                    if types[index] is None and value is not None:
                        types[index] = _storage_class(value)
                if None not in types:
                    break
            self.description = tuple((name, kind, None, None, None, None, None)
                                     for name, kind in zip(columns, types))
            self._rows = rows
        else:
            self.description = None
            self._rows = None
        self.rowcount = result.get("changes", -1) if word in _DML else -1
        self._position = 0

    def executemany(self, sql, seq_of_parameters):
        """Runs one DML statement once per parameter set, in requests under the daemon's line limit
        (in one transaction even when more than one request is needed)."""
        self._check()
        self._reset()
        if ";" in sql and len(_split(sql)) > 1:
            raise ProgrammingError("You can only execute one statement at a time.")
        connection = self.connection
        batches, batch, size = [], [], 0
        for parameters in seq_of_parameters:
            bound = _bind_parameters(parameters)
            cost = len(repr(bound)) + 8
            if batch and size + cost > EXECUTEMANY_REQUEST_BYTES:
                batches.append(batch)
                batch, size = [], 0
            batch.append(bound)
            size += cost
        if batch or not batches:
            batches.append(batch)
        word = _first_word(sql)
        connection._after_statement(connection._before_statement(word))
        connection._read_only = False
        own = len(batches) > 1 and not connection._in_transaction and connection._prepared is None
        if own:
            connection._begin()
        changes = 0
        try:
            for batch in batches:
                result = connection._request("executemany", sql=sql, params=batch, database=connection.database)
                changes += result.get("changes", 0)
            if own:
                connection._commit()
        except BaseException:
            if own and connection._in_transaction and not connection.closed:
                connection.rollback()
            raise
        self.rowcount = changes if word in _DML else -1
        return self

    def executescript(self, sql_script):
        """Commits a pending transaction (as sqlite3 does), then runs each statement of the script,
        transaction statements included."""
        self._check()
        connection = self.connection
        if connection._autocommit == LEGACY_TRANSACTION_CONTROL and connection._in_transaction:
            connection._commit()
        for statement in _split(sql_script):
            self.execute(statement)
        return self

    def _take_row(self, row):
        return self.row_factory(self, row) if self.row_factory is not None else row

    def _result_rows(self):
        self._check()
        if self._rows is None:
            raise ProgrammingError("no result set: the last execute did not return rows (or there was none)")
        return self._rows

    def fetchone(self):
        rows = self._result_rows()
        if self._position >= len(rows):
            return None
        row = rows[self._position]
        self._position += 1
        return self._take_row(row)

    def fetchmany(self, size=None):
        rows = self._result_rows()
        size = self.arraysize if size is None else size
        chunk = rows[self._position:self._position + max(size, 0)]
        self._position += len(chunk)
        return [self._take_row(row) for row in chunk]

    def fetchall(self):
        rows = self._result_rows()
        chunk = rows[self._position:]
        self._position = len(rows)
        return [self._take_row(row) for row in chunk]

    def __iter__(self):
        return self

    def __next__(self):
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row
