"""The SQLAlchemy dialect (evd:///) against a live evd ($EVD_SOCKET): what sqlalchemy.testing.suite
does not cover — real transactions, savepoints, two-phase commit, AUTOCOMMIT, vetoes, disconnects,
URLs, evd's own tables kept out of reflection. scripts/sqlalchemy-suite runs SQLAlchemy's suite."""
import os
import socket
import threading
import unittest
import uuid

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import registry
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import evd
from evd import dbapi

registry.register("evd", "evd.dialect", "EvdDialect")
SOCKET = os.environ.get("EVD_SOCKET")


def engine(**kwargs):
    return sa.create_engine("evd:///main?socket=%s" % SOCKET, **kwargs)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "dialect_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


class DialectTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.engine = engine()
        Base.metadata.drop_all(cls.engine)
        Base.metadata.create_all(cls.engine)

    @classmethod
    def tearDownClass(cls):
        cls.engine.dispose()

    def setUp(self):
        with self.engine.begin() as connection:
            connection.execute(sa.delete(Note.__table__))

    def tearDown(self):
        # A prepared transaction holds SQLite's write lock until decided: never leave one behind.
        with dbapi.connect(socket=SOCKET) as conn:
            for xid in conn.tpc_recover():
                conn.tpc_rollback(xid)

    def texts(self):
        with engine().connect() as other:
            return sorted(other.scalars(sa.select(Note.text)).all())

    def test_a_transaction_reads_one_snapshot(self):
        # pysqlite begins only before DML; evd's dialect begins at the first statement, SELECTs too.
        with self.engine.connect() as reader:
            self.assertEqual(reader.scalar(sa.select(sa.func.count()).select_from(Note)), 0)
            with engine().begin() as writer:
                writer.execute(sa.insert(Note), [{"text": "later"}])
            self.assertEqual(reader.scalar(sa.select(sa.func.count()).select_from(Note)), 0)
            reader.rollback()
            self.assertEqual(reader.scalar(sa.select(sa.func.count()).select_from(Note)), 1)

    def test_savepoints(self):
        with Session(self.engine) as session:
            session.add(Note(text="kept"))
            savepoint = session.begin_nested()
            session.add(Note(text="dropped"))
            session.flush()
            savepoint.rollback()
            with session.begin_nested():
                session.add(Note(text="released"))
            self.assertEqual(self.texts(), [])
            session.commit()
        self.assertEqual(self.texts(), ["kept", "released"])

    def test_two_phase_commit_and_recovery(self):
        connection = self.engine.connect()
        transaction = connection.begin_twophase()
        connection.execute(sa.insert(Note), [{"text": "prepared"}])
        transaction.prepare()
        xid = transaction.xid
        with self.engine.connect() as other:
            self.assertIn(xid, other.recover_twophase())
            other.commit_prepared(xid, recover=True)
            self.assertNotIn(xid, other.recover_twophase())
        connection.invalidate()
        connection.close()
        self.assertEqual(self.texts(), ["prepared"])

    def test_two_phase_rollback(self):
        with self.engine.connect() as connection:
            transaction = connection.begin_twophase()
            connection.execute(sa.insert(Note), [{"text": "never"}])
            transaction.prepare()
            transaction.rollback()
        self.assertEqual(self.texts(), [])

    def test_autocommit_isolation_level(self):
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            self.assertEqual(connection.get_isolation_level(), "AUTOCOMMIT")
            connection.execute(sa.insert(Note), [{"text": "at once"}])
            self.assertEqual(self.texts(), ["at once"])
        with self.engine.connect() as connection:
            self.assertEqual(connection.get_isolation_level(), "SERIALIZABLE")

    def test_a_veto_reaches_the_application(self):
        listener = evd.Client(SOCKET)
        name = "no-notes-" + uuid.uuid4().hex[:6]

        @listener.veto("before_cursor_execute", name=name)
        def no_deletes(veto):
            if veto["statement"].lstrip().upper().startswith("DELETE FROM DIALECT_NOTES"):
                return evd.deny("notes are kept")
            return evd.ALLOW

        thread = threading.Thread(target=listener.serve, daemon=True)
        thread.start()
        try:
            with Session(self.engine) as session:
                session.add(Note(text="precious"))
                session.commit()
                session.delete(session.scalars(sa.select(Note)).one())
                with self.assertRaises(exc.OperationalError) as caught:
                    session.commit()
                veto = caught.exception.orig
                self.assertIsInstance(veto, dbapi.Vetoed)
                self.assertEqual((veto.event, veto.by, veto.reason), ("before_cursor_execute", name, "notes are kept"))
                self.assertIn(name, str(caught.exception))
        finally:
            listener.sock.shutdown(socket.SHUT_RDWR)
            thread.join(5)
            listener.close()
        self.assertEqual(self.texts(), ["precious"])

    def test_a_lost_connection_is_a_disconnect(self):
        with self.engine.connect() as connection:
            connection.connection.dbapi_connection.client.sock.shutdown(socket.SHUT_RDWR)
            with self.assertRaises(exc.DBAPIError) as caught:
                connection.execute(sa.text("select 1"))
            self.assertTrue(caught.exception.connection_invalidated)
        with self.engine.connect() as connection:  # the pool replaced it
            self.assertEqual(connection.scalar(sa.text("select 1")), 1)

    def test_reflection_leaves_out_evds_tables(self):
        names = sa.inspect(self.engine).get_table_names()
        self.assertIn("dialect_notes", names)
        self.assertEqual([n for n in names if n.startswith("_evd_")], [])

    def test_the_sqlite_version_is_the_daemons(self):
        with self.engine.connect() as connection:
            version = connection.exec_driver_sql("select sqlite_version()").scalar()
        self.assertEqual(self.engine.dialect.server_version_info, tuple(int(p) for p in version.split(".")))

    def test_urls(self):
        for bad in ("evd://host/main", "evd:///main?nonsense=1", "evd://user@/main", "evd:///main?timeout=soon"):
            with self.assertRaises(exc.ArgumentError, msg=bad):
                sa.create_engine(bad).connect()
        url = sa.engine.make_url("evd:///other?socket=/s.sock&token=evd_x&timeout=2.5")
        _, kwargs = sa.create_engine(url).dialect.create_connect_args(url)
        self.assertEqual(kwargs, {"database": "other", "autocommit": False, "socket": "/s.sock",
                                  "token": "evd_x", "timeout": 2.5})
        # The token as the password: SQLAlchemy masks it wherever it prints the URL.
        url = sa.engine.make_url("evd://:evd_secret@/main")
        self.assertEqual(sa.create_engine(url).dialect.create_connect_args(url)[1]["token"], "evd_secret")
        self.assertNotIn("evd_secret", repr(sa.create_engine(url)))
        with self.assertRaises(exc.ArgumentError):
            bad = sa.engine.make_url("evd://:a@/main?token=b")
            sa.create_engine(bad).dialect.create_connect_args(bad)

    def test_a_token_in_the_url_logs_in(self):
        with self.engine.connect() as connection:
            token = connection.connection.dbapi_connection.client.request(
                "create_token", restrict_all=["view-table", "execute-sql"])["token"]
        restricted = sa.create_engine("evd://:%s@/main?socket=%s" % (token, SOCKET))
        with restricted.connect() as connection:
            connection.execute(sa.select(Note.text)).all()
            with self.assertRaises(exc.OperationalError) as caught:
                connection.execute(sa.insert(Note), [{"text": "not mine to write"}])
            self.assertIsInstance(caught.exception.orig, dbapi.PermissionDenied)
        restricted.dispose()


if __name__ == "__main__":
    unittest.main()
