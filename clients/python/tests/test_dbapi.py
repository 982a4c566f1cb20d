"""evd.dbapi against a live evd ($EVD_SOCKET), beside Python's sqlite3 on a file where they should agree.

    EVD_SOCKET=/tmp/x/evd.sock python -m pytest clients/python/tests/test_dbapi.py

scripts/clients-test starts a daemon and runs this (and test_dbapi20.py, PEP 249's own suite)."""
import datetime
import math
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import unittest
import uuid

import evd
from evd import dbapi

SOCKET = os.environ.get("EVD_SOCKET")


def connect(**kwargs):
    return dbapi.connect(socket=SOCKET, **kwargs)


class Table:
    """A table of its own for each test (the daemon's database is shared by the run)."""

    def __init__(self, connection, columns="id integer primary key, v"):
        self.name = "t_" + uuid.uuid4().hex[:12]
        connection.execute("create table %s (%s)" % (self.name, columns))
        connection.commit()

    def __str__(self):
        return self.name


class ValuesTest(unittest.TestCase):
    """Every value evd stores comes back as sqlite3 returns it: same value, same Python type."""

    VALUES = [
        None, 0, 1, -1, 2**63 - 1, -(2**63), 1.0, -0.5, 0.1, 1e308, 5e-324, float("inf"), float("-inf"),
        "", "text", "naïve ☃ 𝄞", "a\x00b", "line\nbreak", b"", b"\x00\xff\x80", bytes(range(256)),
        True, False,
    ]

    def test_round_trip_matches_sqlite3(self):
        with connect() as conn, tempfile.TemporaryDirectory() as directory:
            table = Table(conn)
            reference = sqlite3.connect(os.path.join(directory, "ref.db"))
            reference.execute("create table %s (id integer primary key, v)" % table)
            for value in self.VALUES:
                conn.execute("insert into %s(v) values (?)" % table, (value,))
                reference.execute("insert into %s(v) values (?)" % table, (value,))
            conn.commit()
            ours = conn.execute("select v, typeof(v) from %s order by id" % table).fetchall()
            theirs = reference.execute("select v, typeof(v) from %s order by id" % table).fetchall()
            self.assertEqual(len(ours), len(self.VALUES))
            for (value, kind), (expected, expected_kind) in zip(ours, theirs):
                self.assertEqual(kind, expected_kind)
                self.assertIs(type(value), type(expected))
                self.assertEqual(value, expected)
                if isinstance(value, float) and value == 0:
                    self.assertEqual(math.copysign(1, value), math.copysign(1, expected))

    def test_nan_is_stored_as_null_as_sqlite_does(self):
        with connect() as conn:
            self.assertEqual(conn.execute("select ?", (float("nan"),)).fetchone(), (None,))

    def test_text_that_is_not_utf8(self):
        with connect() as conn:
            value = conn.execute("select cast(x'ff61' as text)").fetchone()[0]
            self.assertEqual(value.encode("utf-8", "surrogateescape"), b"\xffa")
            self.assertEqual(conn.execute("select hex(?), typeof(?)", (value, value)).fetchone(), ("FF61", "text"))

    def test_integer_beyond_64_bits_is_overflow_error_as_in_sqlite3(self):
        with connect() as conn:
            with self.assertRaises(OverflowError):
                conn.execute("select ?", (2**63,))

    def test_unsupported_type_is_programming_error(self):
        with connect() as conn:
            with self.assertRaises(dbapi.ProgrammingError):
                conn.execute("select ?", (object(),))

    def test_dates_use_sqlite3s_default_adapters(self):
        with connect() as conn:
            row = conn.execute("select ?, ?", (datetime.date(2026, 12, 6), datetime.datetime(2026, 12, 6, 8, 0, 1))).fetchone()
            self.assertEqual(row, ("2026-12-06", "2026-12-06 08:00:01"))

    def test_named_parameters(self):
        with connect() as conn:
            row = conn.execute("select :a, @b, $c", {"a": 1, "b": "two", "c": b"3"}).fetchone()
            self.assertEqual(row, (1, "two", b"3"))

    def test_description_and_type_codes(self):
        with connect() as conn:
            cursor = conn.execute("select 1 as i, 1.5 as r, 'x' as s, x'00' as b, null as n")
            self.assertEqual([d[0] for d in cursor.description], ["i", "r", "s", "b", "n"])
            self.assertEqual([d[1] for d in cursor.description], ["INTEGER", "REAL", "TEXT", "BLOB", None])
            self.assertEqual(cursor.description[0][1], dbapi.NUMBER)
            self.assertEqual(cursor.description[2][1], dbapi.STRING)
            self.assertEqual(cursor.description[3][1], dbapi.BINARY)
            self.assertNotEqual(cursor.description[2][1], dbapi.NUMBER)

    def test_row_factory(self):
        with connect() as conn:
            conn.row_factory = lambda cursor, row: {d[0]: v for d, v in zip(cursor.description, row)}
            self.assertEqual(conn.execute("select 1 as a, 2 as b").fetchone(), {"a": 1, "b": 2})


class CursorTest(unittest.TestCase):
    def test_rowcount_lastrowid_and_fetching(self):
        with connect() as conn:
            table = Table(conn)
            cursor = conn.cursor()
            cursor.execute("insert into %s(v) values (?)" % table, ("a",))
            self.assertEqual((cursor.rowcount, cursor.lastrowid, cursor.description), (1, 1, None))
            cursor.executemany("insert into %s(v) values (?)" % table, [("b",), ("c",), ("d",)])
            self.assertEqual(cursor.rowcount, 3)
            cursor.execute("update %s set v = v || '!' where id > 1" % table)
            self.assertEqual(cursor.rowcount, 3)
            cursor.execute("select id, v from %s order by id" % table)
            self.assertEqual(cursor.rowcount, -1)
            self.assertEqual(cursor.fetchone(), (1, "a"))
            cursor.arraysize = 2
            self.assertEqual(cursor.fetchmany(), [(2, "b!"), (3, "c!")])
            self.assertEqual(list(cursor), [(4, "d!")])
            self.assertIsNone(cursor.fetchone())
            cursor.execute("delete from %s where id = 4 returning v" % table)
            self.assertEqual((cursor.fetchall(), cursor.rowcount), ([("d!",)], 1))
            conn.commit()

    def test_fetch_without_a_result_set_is_an_error(self):
        with connect() as conn:
            cursor = conn.cursor()
            with self.assertRaises(dbapi.ProgrammingError):
                cursor.fetchone()
            table = Table(conn)
            cursor.execute("insert into %s(v) values (1)" % table)
            with self.assertRaises(dbapi.ProgrammingError):
                cursor.fetchall()

    def test_one_statement_at_a_time_and_executescript(self):
        with connect() as conn:
            table = Table(conn)
            with self.assertRaises(dbapi.ProgrammingError):
                conn.execute("insert into %s(v) values (1); drop table %s" % (table, table))
            conn.execute("select 1; -- a trailing comment")
            conn.execute("select ';' as semicolon;")
            conn.executescript("""
                begin;
                insert into %(t)s(v) values ('x;y');
                create trigger %(t)s_trg after insert on %(t)s begin select 1; end;
                commit;
            """ % {"t": table})
            self.assertFalse(conn.in_transaction)
            self.assertEqual(conn.execute("select v from %s" % table).fetchall(), [("x;y",)])

    def test_executemany_beyond_one_request_is_one_transaction(self):
        with connect(autocommit=True) as conn:
            table = Table(conn, "id integer primary key, v text not null")
            big = "x" * 1000
            rows = [(big,) for _ in range(1500)] + [(None,)]  # ~1.5 MB of parameters, the last one fails
            with self.assertRaises(dbapi.IntegrityError):
                conn.executemany("insert into %s(v) values (?)" % table, rows)
            self.assertEqual(conn.execute("select count(*) from %s" % table).fetchone(), (0,))
            conn.executemany("insert into %s(v) values (?)" % table, rows[:-1])
            self.assertEqual(conn.execute("select count(*) from %s" % table).fetchone(), (1500,))

    def test_closed_cursor_and_connection(self):
        conn = connect()
        cursor = conn.cursor()
        cursor.close()
        with self.assertRaises(dbapi.ProgrammingError):
            cursor.execute("select 1")
        other = conn.cursor()
        conn.close()
        with self.assertRaises(dbapi.ProgrammingError):
            other.execute("select 1")
        with self.assertRaises(dbapi.ProgrammingError):
            conn.commit()
        with self.assertRaises(dbapi.ProgrammingError):
            conn.close()


class TransactionTest(unittest.TestCase):
    """sqlite3's transaction control, with another connection watching what is committed."""

    def count(self, table):
        with connect() as other:
            return other.execute("select count(*) from %s" % table).fetchone()[0]

    def test_legacy_mode_begins_before_dml_only(self):
        with connect() as conn:
            table = Table(conn)
            conn.execute("select * from %s" % table)
            self.assertFalse(conn.in_transaction)
            conn.execute("insert into %s(v) values (1)" % table)
            self.assertTrue(conn.in_transaction)
            self.assertEqual(self.count(table), 0)
            conn.commit()
            self.assertEqual(self.count(table), 1)
            conn.execute("insert into %s(v) values (2)" % table)
            conn.rollback()
            self.assertEqual(self.count(table), 1)

    def test_isolation_level_none_is_autocommit(self):
        with connect(isolation_level=None) as conn:
            table = Table(conn)
            conn.execute("insert into %s(v) values (1)" % table)
            self.assertFalse(conn.in_transaction)
            self.assertEqual(self.count(table), 1)

    def test_autocommit_false_is_always_in_a_transaction(self):
        with connect(autocommit=False) as conn:
            table = Table(conn)
            conn.execute("select 1")
            self.assertTrue(conn.in_transaction)
            conn.execute("insert into %s(v) values (1)" % table)
            self.assertEqual(self.count(table), 0)
            conn.commit()
            self.assertEqual(self.count(table), 1)
            conn.autocommit = True  # commits what is open
            conn.execute("insert into %s(v) values (2)" % table)
            self.assertEqual(self.count(table), 2)

    def test_a_read_transaction_sees_one_snapshot_and_its_rollback_ends_it(self):
        with connect(autocommit=False) as conn:
            table = Table(conn)
            self.assertEqual(conn.execute("select count(*) from %s" % table).fetchone(), (0,))
            with connect(isolation_level=None) as other:
                other.execute("insert into %s(v) values (1)" % table)
            self.assertEqual(conn.execute("select count(*) from %s" % table).fetchone(), (0,))
            conn.rollback()  # a read transaction: its answer is read with the next request's
            self.assertFalse(conn.in_transaction)
            self.assertEqual(conn.execute("select count(*) from %s" % table).fetchone(), (1,))
            conn.execute("insert into %s(v) values (2)" % table)  # a write after the reads
            conn.rollback()
            self.assertEqual(self.count(table), 1)

    def test_a_refused_begin_fails_the_select_it_came_with(self):
        listener = evd.Client(SOCKET)
        name = "no-begin-" + uuid.uuid4().hex[:6]
        with connect(autocommit=False) as conn:
            me = conn.client.session

            @listener.veto("begin", name=name, where={"session": me})
            def refuse(veto):
                return evd.deny("not now")

            thread = threading.Thread(target=listener.serve, daemon=True)
            thread.start()
            try:
                with self.assertRaises(dbapi.Vetoed) as caught:
                    conn.execute("select 1")
                self.assertEqual((caught.exception.event, caught.exception.by), ("begin", name))
                self.assertFalse(conn.in_transaction)
            finally:
                listener.sock.shutdown(socket.SHUT_RDWR)
                thread.join(5)
                listener.close()
            self.assertEqual(conn.execute("select 2").fetchone(), (2,))
            self.assertTrue(conn.in_transaction)

    def test_context_manager_commits_or_rolls_back(self):
        conn = connect()
        table = Table(conn)
        with conn:
            conn.execute("insert into %s(v) values (1)" % table)
        self.assertEqual(self.count(table), 1)
        with self.assertRaises(ZeroDivisionError):
            with conn:
                conn.execute("insert into %s(v) values (2)" % table)
                1 / 0
        self.assertEqual(self.count(table), 1)
        conn.close()

    def test_closing_inside_a_transaction_rolls_it_back(self):
        conn = connect()
        table = Table(conn)
        conn.execute("insert into %s(v) values (1)" % table)
        conn.close()
        self.assertEqual(self.count(table), 0)

    def test_transaction_sql_becomes_evds_ops(self):
        with connect(isolation_level=None) as conn:
            table = Table(conn)
            conn.execute("BEGIN IMMEDIATE")
            self.assertTrue(conn.in_transaction)
            with self.assertRaises(dbapi.OperationalError):
                conn.execute("begin")
            conn.execute("insert into %s(v) values (1)" % table)
            conn.execute('SAVEPOINT "sp 1"')
            conn.execute("insert into %s(v) values (2)" % table)
            conn.execute('ROLLBACK TO SAVEPOINT "sp 1"')
            conn.execute('RELEASE "sp 1"')
            conn.execute("COMMIT")
            self.assertEqual(self.count(table), 1)
            with self.assertRaises(dbapi.OperationalError):
                conn.execute("commit")

    def test_a_savepoint_outside_a_transaction_begins_one_and_its_release_commits(self):
        with connect(isolation_level=None) as conn:
            table = Table(conn)
            conn.savepoint("outer")
            self.assertTrue(conn.in_transaction)
            conn.execute("insert into %s(v) values (1)" % table)
            self.assertEqual(self.count(table), 0)
            conn.release_savepoint("outer")
            self.assertFalse(conn.in_transaction)
            self.assertEqual(self.count(table), 1)
            with self.assertRaises(dbapi.OperationalError):
                conn.release_savepoint("outer")

    def test_two_phase_commit_decided_by_another_connection(self):
        first = connect()
        table = Table(first)
        xid = first.xid(1, "gtrid-" + uuid.uuid4().hex[:8], "branch")
        first.tpc_begin(xid)
        first.execute("insert into %s(v) values (1)" % table)
        first.tpc_prepare()
        with connect() as second:
            self.assertIn(first._xid_text(xid), second.tpc_recover())
            second.tpc_commit(first._xid_text(xid))
            self.assertNotIn(first._xid_text(xid), second.tpc_recover())
        self.assertEqual(self.count(table), 1)
        first.close()

    def test_two_phase_rollback_and_one_phase_commit(self):
        with connect() as conn:
            table = Table(conn)
            conn.tpc_begin("rb-" + uuid.uuid4().hex[:8])
            conn.execute("insert into %s(v) values (1)" % table)
            with self.assertRaises(dbapi.ProgrammingError):
                conn.commit()  # PEP 249: not inside a two-phase transaction
            conn.tpc_prepare()
            conn.tpc_rollback()
            self.assertEqual(self.count(table), 0)
            conn.tpc_begin("one-" + uuid.uuid4().hex[:8])
            conn.execute("insert into %s(v) values (2)" % table)
            conn.tpc_commit()  # not prepared: one phase
            self.assertEqual(self.count(table), 1)


class AttachTest(unittest.TestCase):
    def test_an_attached_database_lasts_for_the_connection(self):
        with tempfile.TemporaryDirectory() as directory, connect(autocommit=False) as conn:
            os.chmod(directory, 0o755)
            path = os.path.join(directory, "side.db")
            conn.execute("ATTACH DATABASE ? AS side", (path,))  # begins no transaction: SQLite refuses one
            conn.execute("create table side.notes(x)")
            conn.execute("insert into side.notes values (1)")
            conn.commit()
            self.assertEqual(conn.execute("select x from side.notes").fetchall(), [(1,)])
            with connect() as other:  # another session never sees it
                with self.assertRaises(dbapi.OperationalError):
                    other.execute("select x from side.notes")
            conn.rollback()
            conn.execute("DETACH DATABASE side")
            with self.assertRaises(dbapi.OperationalError):
                conn.execute("select x from side.notes")


class ErrorTest(unittest.TestCase):
    def test_constraint_errors_are_integrity_errors_with_sqlites_names(self):
        with connect() as conn:
            table = Table(conn, "id integer primary key, v text unique not null")
            conn.execute("insert into %s(v) values ('a')" % table)
            for sql, name in [("insert into %s(v) values ('a')", "SQLITE_CONSTRAINT_UNIQUE"),
                              ("insert into %s(v) values (null)", "SQLITE_CONSTRAINT_NOTNULL"),
                              ("insert into %s(id, v) values (1, 'b')", "SQLITE_CONSTRAINT_PRIMARYKEY")]:
                with self.assertRaises(dbapi.IntegrityError) as caught:
                    conn.execute(sql % table)
                self.assertEqual(caught.exception.sqlite_errorname, name)
                self.assertEqual(caught.exception.sqlite_errorcode, getattr(sqlite3, name))
                self.assertEqual(caught.exception.code, "sql_error")
            conn.rollback()

    def test_sql_errors_are_operational_errors_as_in_sqlite3(self):
        with connect() as conn:
            for sql in ("select * from no_such_table", "selec 1"):
                with self.assertRaises(dbapi.OperationalError) as caught:
                    conn.execute(sql)
                with self.assertRaises(sqlite3.OperationalError):
                    sqlite3.connect(":memory:").execute(sql)
                self.assertEqual(caught.exception.sqlite_errorname, "SQLITE_ERROR")

    def test_a_vetoed_statement_names_the_event_the_listener_and_the_reason(self):
        listener = evd.Client(SOCKET)

        @listener.veto("before_cursor_execute", name="no-deletes-" + uuid.uuid4().hex[:6])
        def no_deletes(veto):
            if veto["statement"].lstrip().lower().startswith("delete") and "vetotest" in veto["statement"]:
                return evd.deny("deletes are audited")
            return evd.ALLOW

        thread = threading.Thread(target=listener.serve, daemon=True)
        thread.start()
        try:
            with connect() as conn:
                conn.execute("create table if not exists vetotest(id integer primary key)")
                conn.execute("insert into vetotest default values")
                conn.commit()
                with self.assertRaises(dbapi.Vetoed) as caught:
                    conn.execute("delete from vetotest")
                error = caught.exception
                self.assertIsInstance(error, dbapi.OperationalError)
                self.assertEqual((error.code, error.event, error.reason), ("vetoed", "before_cursor_execute", "deletes are audited"))
                self.assertTrue(error.by.startswith("no-deletes-"))
                for part in ("before_cursor_execute", error.by, "deletes are audited"):
                    self.assertIn(part, str(error))
                conn.rollback()
                self.assertGreaterEqual(conn.execute("select count(*) from vetotest").fetchone()[0], 1)
        finally:
            listener.sock.shutdown(socket.SHUT_RDWR)  # serve() sees the end; evd drops the listener
            thread.join(5)
            listener.close()

    def test_permission_denied_as_another_uid(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to run a child as uid 65534")
        socket_dir = os.path.dirname(SOCKET)
        mode = os.stat(SOCKET).st_mode & 0o777
        if not (mode & 0o002 and os.stat(socket_dir).st_mode & 0o001):
            self.skipTest("the daemon's socket is not reachable by other uids (socket mode %o)" % mode)
        child = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
             "import sys; sys.path.insert(0, %r)\n"
             "from evd import dbapi\n"
             "c = dbapi.connect(socket=%r)\n"
             "try:\n"
             "    c.execute('select 1')\n"
             "except dbapi.PermissionDenied as e:\n"
             "    print('denied', e.code, isinstance(e, dbapi.OperationalError))\n" % (
                 os.path.dirname(os.path.dirname(os.path.abspath(evd.__file__))), SOCKET)],
            capture_output=True, text=True, timeout=30)
        self.assertEqual(child.stdout.strip(), "denied permission_denied True", child.stderr)

    def test_connecting_to_no_daemon_is_operational_error(self):
        with tempfile.TemporaryDirectory() as directory:
            with self.assertRaises(dbapi.OperationalError) as caught:
                dbapi.connect(socket=os.path.join(directory, "nothing.sock"))
            self.assertIn("No such file", str(caught.exception))

    def test_a_bad_token_is_refused_at_connect(self):
        with self.assertRaises(dbapi.OperationalError) as caught:
            connect(token="evd_not_a_token")
        self.assertEqual(caught.exception.code, "token_invalid")

    def test_a_token_restricts_what_the_connection_may_do(self):
        with connect() as conn:
            table = Table(conn)
            token = conn.client.request("create_token", restrict_all=["view-table", "execute-sql"])["token"]
        with connect(token=token) as restricted:
            restricted.execute("select count(*) from %s" % table)
            with self.assertRaises(dbapi.PermissionDenied):
                restricted.execute("insert into %s(v) values (1)" % table)

    def test_a_result_beyond_the_daemons_response_limit(self):
        with connect() as conn:
            with self.assertRaises(dbapi.OperationalError) as caught:
                conn.execute("select randomblob(51000000)")  # 68 MB as base64: above the 64 MiB default
            self.assertEqual(caught.exception.code, "response_too_large")
            self.assertIn("LIMIT", str(caught.exception))
            self.assertEqual(conn.execute("select 1").fetchone(), (1,))  # the session goes on

    def test_connect_arguments(self):
        with self.assertRaises(TypeError):
            connect(tokne="evd_typo")  # a misspelt argument is not silently ignored
        with self.assertRaises(dbapi.NotSupportedError):
            connect(detect_types=sqlite3.PARSE_DECLTYPES)
        connect(check_same_thread=False, cached_statements=10, uri=False).close()  # sqlite3's, accepted

    def test_unknown_database_is_operational_error(self):
        with connect(database="no_such_db") as conn:
            with self.assertRaises(dbapi.OperationalError) as caught:
                conn.execute("select 1")
            self.assertEqual(caught.exception.code, "no_such_database")


if __name__ == "__main__":
    unittest.main()
