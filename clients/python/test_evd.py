#!/usr/bin/env python3
"""Checks clients/python/evd.py against a running evd ($EVD_SOCKET). Standard library only.

    EVD_SOCKET=/tmp/x/evd.sock python3 clients/python/test_evd.py -v

scripts/clients-test starts a daemon and runs this. Every read has a timeout: a check that would
hang fails instead.
"""

import itertools
import os
import subprocess
import sys
import tempfile
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import evd  # noqa: E402

TIMEOUT = 10


def client():
    return evd.Client(timeout=TIMEOUT)


class Listener:
    """A veto handler on its own connection, served by a thread, closed on exit."""

    def __init__(self, handler, *names, **options):
        self.client = client()
        self.handler = self.client.veto(*(names or ("before_cursor_execute",)), **options)(handler)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.error = None

    def _serve(self):
        try:
            self.client.serve()
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        # shutdown() ends the serving thread's blocking recv; close() would leave it waiting.
        try:
            self.client.sock.shutdown(2)
        except OSError:
            pass
        self.thread.join(TIMEOUT)
        self.client.close()
        assert not self.thread.is_alive(), "the listener thread did not stop"


class SocketPathTests(unittest.TestCase):
    def test_resolution_order(self):
        self.assertEqual(evd.socket_path("/x.sock", {"EVD_SOCKET": "/y"}), "/x.sock")
        self.assertEqual(evd.socket_path(None, {"EVD_SOCKET": "/y", "RUNTIME_DIRECTORY": "/r"}), "/y")
        self.assertEqual(evd.socket_path(None, {"RUNTIME_DIRECTORY": "/r:/s", "XDG_RUNTIME_DIR": "/u"}), "/r/evd.sock")
        self.assertEqual(evd.socket_path(None, {"XDG_RUNTIME_DIR": "/run/user/7"}), "/run/user/7/evd.sock")
        self.assertEqual(evd.socket_path(None, {}), "/tmp/evd-%d/evd.sock" % os.getuid())

    def test_refuses_a_directory_others_can_write(self):
        with tempfile.TemporaryDirectory() as directory:
            os.chmod(directory, 0o777)
            with self.assertRaises(evd.ConnectionClosed) as refused:
                evd.Client(directory + "/evd.sock")
            self.assertIn("refusing the socket directory %s: its mode 0777" % directory, str(refused.exception))
            os.chmod(directory, 0o1777)  # sticky and the user's own: accepted (nobody listens there)
            with self.assertRaises(evd.ConnectionClosed) as unreachable:
                evd.Client(directory + "/evd.sock")
            self.assertIn("cannot connect", str(unreachable.exception))

    def test_no_daemon_is_connection_closed(self):
        with self.assertRaises(evd.ConnectionClosed):
            evd.Client("/nonexistent/evd.sock")


class RequestTests(unittest.TestCase):
    def test_hello_and_ping(self):
        with client() as c:
            self.assertEqual(c.hello["type"], "hello")
            self.assertEqual(c.hello["protocol"], 1)
            self.assertIn("main", c.hello["databases"])
            self.assertEqual(c.actor["uid"], os.getuid())
            self.assertEqual(c.ping(), {})

    def test_execute_and_structured_ops(self):
        with client() as c:
            c.execute("create table if not exists py_dogs(id integer primary key, name text, photo blob)")
            result = c.request("insert", table="py_dogs", rows=[{"name": "Rex", "photo": evd.blob(b"\x00\xff")}])
            self.assertEqual(result["inserted"], 1)
            rows = c.execute("select name, photo from py_dogs where name = ?", ["Rex"])["rows"]
            self.assertEqual(rows[0][0], "Rex")
            self.assertEqual(evd.unblob(rows[0][1]), b"\x00\xff")
            self.assertEqual(c.execute("select :a + :b", {"a": 40, "b": 2})["rows"], [[42]])

    def test_values_that_plain_json_cannot_hold(self):
        # docs/protocol.md "Values": ±inf, TEXT that is not UTF-8, a whole REAL; read, then written back.
        with client() as c:
            c.execute("create table if not exists py_values(id integer primary key, r real, t text)")
            rows = c.execute("select 1e999, -1e999, cast(x'ff41' as text), 2.0")["rows"]
            values = evd.decode_row(rows[0])
            self.assertEqual(values[:2], [float("inf"), float("-inf")])
            self.assertEqual(values[2].encode("utf-8", "surrogateescape"), b"\xffA")
            self.assertIsInstance(values[3], float)
            c.request("insert", table="py_values", rows=[{"id": 1, "r": evd.encode_value(values[0]), "t": evd.encode_value(values[2])}])
            stored = c.execute("select typeof(r), r, typeof(t), hex(t) from py_values where id = 1")["rows"][0]
            self.assertEqual(evd.decode_row(stored), ["real", float("inf"), "text", "FF41"])
            self.assertEqual(evd.encode_value("plain"), "plain")

    def test_errors(self):
        with client() as c:
            with self.assertRaises(evd.EvdError) as caught:
                c.execute("select * from no_such_table_here")
            self.assertEqual(caught.exception.code, "sql_error")
            self.assertIn("no_such_table_here", caught.exception.message)
            self.assertTrue(caught.exception.extra.get("sqlite_code", "").startswith("SQLITE_"))
            self.assertEqual(caught.exception.sqlite_code, caught.exception.extra["sqlite_code"])
            self.assertEqual(caught.exception.op, "execute")

            with self.assertRaises(evd.EvdError) as caught:
                c.request("execute", sql="select 1", bogus=True)
            self.assertEqual(caught.exception.code, "bad_request")
            self.assertEqual(caught.exception.field, "bogus")

            with self.assertRaises(evd.EvdError) as caught:
                c.request("no_such_op")
            self.assertEqual(caught.exception.code, "unknown_op")
            # The connection is still usable after errors.
            self.assertEqual(c.ping(), {})

    def test_emit(self):
        with client() as c:
            seq = c.emit("pytest.ran", {"ok": True})
            self.assertIsInstance(seq, int)


class EventTests(unittest.TestCase):
    def test_events_generator(self):
        with client() as watcher, client() as writer:
            events = watcher.events("insert-rows", where={"table": "py_events"})
            writer.execute("create table if not exists py_events(x)")
            writer.execute("insert into py_events values (1), (2)")
            writer.request("insert", table="py_events", rows=[{"x": 3}])
            first, second = next(events), next(events)
            self.assertEqual((first["event"], first["table"], first["num_rows"]), ("insert-rows", "py_events", 2))
            self.assertEqual(second["num_rows"], 1)
            self.assertLess(first["seq"], second["seq"])
            self.assertEqual(watcher.last_seq, second["seq"])

    def test_events_kept_while_a_request_waits(self):
        with client() as c:
            c.subscribe("pytest.*")
            c.emit("pytest.one", {"n": 1})    # its event may arrive before emit's response
            c.emit("pytest.two", {"n": 2})
            names = [e["event"] for e in itertools.islice(c.events(), 2)]
            self.assertEqual(names, ["pytest.one", "pytest.two"])

    def test_replay_with_since(self):
        with client() as c:
            seq = c.emit("pytest.replayed", {"n": 7})
        with client() as c:
            event = next(c.events("pytest.replayed", since=seq - 1))
            self.assertEqual((event["seq"], event["n"]), (seq, 7))

    def test_caught_up_after_the_replay(self):
        with client() as c:
            seq = c.emit("pytest.caught", {"n": 1})
        with client() as c:
            caught = []
            c.on_notice(lambda notice: caught.append(notice) if notice.get("code") == "caught_up" else None)
            result = c.subscribe("pytest.caught", since=seq - 1)
            event = next(c.events())
            self.assertEqual(event["seq"], seq)
            c.ping()  # the notice follows the replayed event
            self.assertEqual([(n["subscription"], n["seq"]) for n in caught], [(result["subscription"], result["seq"])])

    def test_read_your_writes(self):
        with client() as reader, client() as writer:
            reader.subscribe("insert-rows", where={"table": "py_ryw"})
            writer.execute("create table if not exists py_ryw(x)")
            self.assertIsNotNone(writer.committed_seq)
            writer.execute("insert into py_ryw values (1)")
            seq = writer.committed_seq
            reader.wait(seq)  # the event is read by the time wait answers
            self.assertIn(seq, [m.get("seq") for m in reader._pending if m.get("type") == "event"])
            before = writer.committed_seq
            writer.execute("select * from py_ryw")  # commits nothing: the seq stays
            self.assertEqual(writer.committed_seq, before)
            with self.assertRaises(evd.EvdError) as caught:
                reader.wait(seq + 10**6, timeout_ms=20)
            self.assertEqual(caught.exception.code, "timeout")

    def test_durable_cursor(self):
        name = "pytest.cursor.%d" % os.getpid()
        with client() as c:
            result = c.subscribe("pytest.cursored", cursor=name)
            self.assertEqual(result["cursor"]["name"], name)
            first = c.emit("pytest.cursored", {"n": 1})
            second = c.emit("pytest.cursored", {"n": 2})
            events = list(itertools.islice(c.events(), 2))
            self.assertEqual([e["seq"] for e in events], [first, second])
            self.assertEqual(events[0]["epoch"], c.hello["epoch"])
            self.assertEqual(c.ack(result["subscription"], first), first)
        # The acknowledged one is not seen again; the other is.
        with client() as c:
            event = next(c.events("pytest.cursored", cursor=name))
            self.assertEqual((event["seq"], event["n"]), (second, 2))
        with client() as c:
            c.delete_cursor(name)
            with self.assertRaises(evd.EvdError) as caught:
                c.delete_cursor(name)
            self.assertEqual(caught.exception.code, "no_such_cursor")


class VetoTests(unittest.TestCase):
    def test_deny(self):
        def no_drops(veto):
            if "drop" in veto["statement"].lower():
                return evd.deny("no drops in the tests")
            return None

        with client() as c:
            c.execute("create table if not exists py_keep(x)")
        with Listener(no_drops, name="py-no-drops"), client() as c:
            with self.assertRaises(evd.EvdError) as caught:
                c.execute("drop table py_keep")
            self.assertEqual(caught.exception.code, "vetoed")
            self.assertEqual(caught.exception.reason, "no drops in the tests")
            self.assertEqual(caught.exception.by, "py-no-drops")
            self.assertEqual(c.execute("select count(*) from py_keep")["rows"], [[0]])

    def test_modify_rewrites_the_statement(self):
        def rewrite(veto):
            if veto["statement"] == "select 'cats'":
                return evd.modify(statement="select 'dogs'")
            return True

        with Listener(rewrite, "before_cursor_execute", name="py-rewrite"), client() as c:
            self.assertEqual(c.execute("select 'cats'")["rows"], [["dogs"]])
            self.assertEqual(c.execute("select 'birds'")["rows"], [["birds"]])

    def test_dict_modifies_and_false_denies(self):
        with Listener(lambda v: {"statement": "select 2"} if v["statement"] == "select 1" else
                      (False if v["statement"] == "select 3" else None)), client() as c:
            self.assertEqual(c.execute("select 1")["rows"], [[2]])
            with self.assertRaises(evd.EvdError) as caught:
                c.execute("select 3")
            self.assertEqual(caught.exception.code, "vetoed")

    def test_a_handler_that_raises_denies(self):
        def broken(veto):
            raise RuntimeError("policy bug")

        with Listener(broken, name="py-broken"), client() as c, self.assertLogs("evd", "ERROR"):
            with self.assertRaises(evd.EvdError) as caught:
                c.execute("select 1")
            self.assertEqual(caught.exception.code, "vetoed")
            self.assertIn("policy bug", caught.exception.reason)

    def test_own_veto_is_answered_while_waiting(self):
        with client() as c:
            @c.veto("before_cursor_execute", name="py-self")
            def double(veto):
                return evd.modify(statement="select 84") if veto["statement"] == "select 42" else None

            self.assertEqual(c.execute("select 42")["rows"], [[84]])

    def test_a_handler_may_make_requests_on_its_client(self):
        with client() as c:
            c.execute("create table if not exists py_audit(statement text)")
        listeners = []

        def record(veto):
            if "py_audit" not in veto["statement"]:  # its own insert is vetoed (allowed) too
                listeners[0].client.execute("insert into py_audit values (?)", [veto["statement"]])

        with Listener(record, name="py-recorder") as listener, client() as c:
            listeners.append(listener)
            self.assertEqual(c.execute("select 'recorded'")["rows"], [["recorded"]])
            self.assertIn(["select 'recorded'"], c.execute("select statement from py_audit")["rows"])

    def test_plain_subscribers_see_the_outcome(self):
        with client() as c:
            c.execute("create table if not exists py_never(x)")
        with client() as watcher:
            events = watcher.events("before_cursor_execute", where={"statement": "drop table py_never"})
            with Listener(lambda v: evd.deny("never") if v["statement"].startswith("drop") else None,
                          name="py-audit"), client() as c:
                with self.assertRaises(evd.EvdError):
                    c.execute("drop table py_never")
            event = next(events)
            self.assertEqual(event["outcome"]["action"], "deny")
            self.assertEqual(event["outcome"]["by"], "py-audit")


class NoticeTests(unittest.TestCase):
    def test_notice_handler(self):
        with client() as c:
            seen = []
            c.on_notice(seen.append)
            # Feed a notice through the reader as the daemon would send it.
            c._buffer += b'{"type":"notice","code":"gap","from":1,"to":5}\n{"type":"event","seq":9,"event":"x.y"}\n'
            self.assertEqual(next(c.events())["seq"], 9)
            self.assertEqual(seen, [{"type": "notice", "code": "gap", "from": 1, "to": 5}])
            self.assertEqual(c.notices[-1]["code"], "gap")


class ExampleTests(unittest.TestCase):
    def run_example(self, name, *args):
        return subprocess.run([sys.executable, os.path.join(HERE, "examples", name), *args],
                              capture_output=True, text=True, timeout=TIMEOUT)

    def test_dogs_example(self):
        result = self.run_example("dogs.py")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("'name': 'Rex'", result.stdout)
        self.assertIn("error: sql_error SQLITE_ERROR", result.stdout)

    def test_listen_example(self):
        listener = subprocess.Popen([sys.executable, os.path.join(HERE, "examples", "listen.py"), "insert-rows"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with client() as c:
                c.execute("create table if not exists py_listened(x)")
                # Wait until the example has subscribed: its login event, then one more connection.
                for _ in range(100):
                    c.execute("insert into py_listened values (1)")
                    line = _readline(listener.stdout, 0.1)
                    if line:
                        break
                self.assertRegex(line, r"^\d+ insert-rows py_listened 1$")
        finally:
            listener.terminate()
            listener.wait(TIMEOUT)
            listener.stdout.close()
            listener.stderr.close()


def _readline(stream, timeout):
    import select
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline().strip() if ready else ""


if __name__ == "__main__":
    unittest.main()
