"""evd's client for Python: the standard library only (PROTOCOL.md is the contract).

    import evd

    with evd.Client() as client:                       # the socket evd's own tools would use
        print(client.request("execute", sql="select 40 + 2"))   # {'columns': [...], 'rows': [[42]], ...}
        for event in client.events("insert-rows", where={"table": "dogs"}):
            print(event["seq"], event["num_rows"])

A veto listener (PROTOCOL.md §4) is a decorated function that returns its decision:

    client = evd.Client()

    @client.veto("before_cursor_execute", name="no-drops")
    def no_drops(veto):
        if "drop" in veto["statement"].lower():
            return evd.deny("no drops on Fridays")
        if veto["statement"] == "select 1":
            return evd.modify(statement="select 2")
        return evd.ALLOW                                  # or None, or True

    client.serve()                                        # answers vetoes until the connection ends

A handler's return value: None, True or ALLOW allows; False or deny(reason) denies; modify(**props)
or a dict of properties modifies. A handler that raises denies, with the exception as the reason.

Vetoes are answered whenever the client reads from the socket: in serve(), while iterating
events(), and while request() waits for its response (so a request that triggers this same
client's veto does not deadlock). Notices (lagged, gap, caught_up, shutdown) go to on_notice handlers and are
kept in `client.notices`; the last one with `last_seq` tells where to resume (`since=`).

A handler may make requests on its own client while serve() runs. But requests on one connection
run one after another: a veto caused by the client's own running request cannot wait for another
request on that client (the veto times out); use a second Client for that.

One Client is one connection; use it from one thread at a time.
"""

import base64
import json
import logging
import os
import socket
import stat

__all__ = [
    "Client", "EvdError", "ConnectionClosed", "socket_path", "check_socket_directory", "connect",
    "ALLOW", "allow", "deny", "modify", "blob", "unblob",
]

log = logging.getLogger("evd")


def socket_path(explicit=None, environ=None):
    """The daemon's socket, resolved as every evd program resolves it (PROTOCOL.md §1):
    `explicit`, else $EVD_SOCKET, else $RUNTIME_DIRECTORY/evd.sock (the first directory),
    else $XDG_RUNTIME_DIR/evd.sock, else /tmp/evd-$UID/evd.sock.

    The systemd units put the socket at /run/evd/evd.sock: set EVD_SOCKET to that."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit
    if env.get("EVD_SOCKET"):
        return env["EVD_SOCKET"]
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":", 1)[0] + "/evd.sock"
    if env.get("XDG_RUNTIME_DIR"):
        return env["XDG_RUNTIME_DIR"] + "/evd.sock"
    return "/tmp/evd-%d/evd.sock" % os.getuid()


def check_socket_directory(path):
    """Refuses (ConnectionClosed) a socket whose directory another user could have made or can
    write: their socket there would get this client's token and requests (PROTOCOL.md §1).

    The default /tmp/evd-$UID must be a real directory owned by this user and writable by nobody
    else; any other directory that others can write must be sticky and root's or this user's."""
    directory = os.path.dirname(path) or "."
    default = path == "/tmp/evd-%d/evd.sock" % os.getuid()
    try:
        info = os.lstat(directory) if default else os.stat(directory)
    except FileNotFoundError:
        return  # no socket there either: connecting says so
    me = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    others_write = mode & 0o022
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "it is a symlink, not a directory; another user may have placed it to intercept evd's socket"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "it is not a directory"
    elif default and info.st_uid != me:
        problem = ("it belongs to uid %d, not to uid %d; another user may have made it to intercept "
                   "evd's socket (remove it, or set EVD_SOCKET)" % (info.st_uid, me))
    elif default and others_write:
        problem = "its mode 0%o lets other users replace the socket in it (chmod 700 it)" % mode
    elif others_write and not (mode & stat.S_ISVTX and info.st_uid in (0, me)):
        problem = "its mode 0%o (owner uid %d) lets other users replace the socket in it with their own" % (
            mode, info.st_uid)
    if problem:
        raise ConnectionClosed("refusing the socket directory %s: %s" % (directory, problem))


class EvdError(Exception):
    """An error response (PROTOCOL.md §7): `code` ("sql_error", "vetoed", ...), `message`, and
    `extra`, the error object's other fields (`sqlite_code`, `event`, `by`, `reason`, `field`)."""

    def __init__(self, code, message="", extra=None, op=None):
        self.code = code
        self.message = message
        self.extra = dict(extra or {})
        self.op = op
        super().__init__("%s: %s" % (code, message) if message else code)

    def __getattr__(self, name):
        # error.sqlite_code, error.reason, ... when the daemon sent them; None otherwise.
        if name.startswith("_") or name in ("code", "message", "extra", "op"):
            raise AttributeError(name)
        return self.__dict__.get("extra", {}).get(name)

    @classmethod
    def from_response(cls, error, op=None):
        error = dict(error or {})
        code = error.pop("code", "unknown")
        message = error.pop("message", "")
        return cls(code, message, error, op)


class ConnectionClosed(EvdError):
    """The daemon closed the connection (it stopped, or it cut off a lagging subscriber)."""

    def __init__(self, message="the daemon closed the connection", notice=None):
        super().__init__("connection_closed", message, {"notice": notice} if notice else None)
        self.notice = notice


class _Decision(dict):
    """A veto decision: the `reply` message without `op` and `seq`."""


ALLOW = _Decision(action="allow")


def allow():
    """Let the action go on."""
    return ALLOW


def deny(reason=None):
    """Stop the action; its client gets error `vetoed` with this reason."""
    decision = _Decision(action="deny")
    if reason is not None:
        decision["reason"] = str(reason)
    return decision


def modify(_set=None, **properties):
    """Go on with these mutable properties replaced: modify(statement="...", parameters=[...])."""
    values = dict(_set or {})
    values.update(properties)
    return _Decision(action="modify", set=values)


def blob(data):
    """A BLOB parameter: bytes as evd's {"$base64": ...}."""
    return {"$base64": base64.b64encode(bytes(data)).decode("ascii")}


def unblob(value):
    """The bytes of a BLOB value ({"$base64": ...}); any other value is returned as it is."""
    if isinstance(value, dict) and set(value) == {"$base64"}:
        return base64.b64decode(value["$base64"])
    return value


def decode_value(value):
    """A SQLite value as evd writes it (docs/protocol.md, "Values") as Python's value:
    {"$base64": ...} as bytes, {"$real": "Infinity"} and {"$real": "-Infinity"} as float('inf')
    and float('-inf'), {"$text_base64": ...} (TEXT that is not valid UTF-8) as a str holding the
    invalid bytes as lone surrogates ('surrogateescape', as os.fsdecode does); any other value as it
    is. encode_value undoes it, so a value read can be written back unchanged."""
    if isinstance(value, dict) and len(value) == 1:
        if "$base64" in value:
            return base64.b64decode(value["$base64"])
        if "$real" in value and value["$real"] in ("Infinity", "-Infinity"):
            return float(value["$real"].lower().replace("infinity", "inf"))
        if "$text_base64" in value:
            return base64.b64decode(value["$text_base64"]).decode("utf-8", "surrogateescape")
    return value


def encode_value(value):
    """A Python value as an evd parameter or row value: bytes as {"$base64": ...}, ±inf as
    {"$real": ...}, a str that is not valid Unicode text (decode_value's lone surrogates) as
    {"$text_base64": ...}; any other value as it is. (NaN has no SQLite form: SQLite stores NULL.)"""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return blob(value)
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return {"$real": "Infinity" if value > 0 else "-Infinity"}
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            data = value.encode("utf-8", "surrogateescape")
            return {"$text_base64": base64.b64encode(data).decode("ascii")}
    return value


def decode_row(row):
    """decode_value of each value of a row (a list, or an object of a row image)."""
    if isinstance(row, dict):
        return {key: decode_value(value) for key, value in row.items()}
    return [decode_value(value) for value in row]


def _decision(result):
    if result is None or result is True:
        return ALLOW
    if result is False:
        return deny()
    if isinstance(result, _Decision):
        return result
    if isinstance(result, str) and result in ("allow", "deny"):
        return _Decision(action=result)
    if isinstance(result, dict):
        return modify(result)
    raise TypeError("a veto handler returns None, True, False, allow(), deny(reason), "
                    "modify(...) or a dict of properties, not %r" % (result,))


class Client:
    """One connection to evd.

    Client(path=None, timeout=None): connects at once and reads the hello (`client.hello`).
    `timeout` (seconds) bounds every read and write; None waits as long as it takes."""

    def __init__(self, path=None, timeout=None, connect_timeout=5.0):
        self.path = socket_path(path)
        self._timeouts = (timeout, connect_timeout)
        self._notice_handlers = []
        self.notices = []
        self.last_seq = None        # the newest event seq this client received
        self.committed_seq = None   # the seq of the last event a request of this client committed
                                    # (its response's `seq`): wait(client.committed_seq) reads your writes
        self._connect()

    def _connect(self):
        """Opens the connection and reads the hello: a new session, with no subscription."""
        timeout, connect_timeout = self._timeouts
        check_socket_directory(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        try:
            self.sock.connect(self.path)
        except OSError as error:
            self.sock.close()
            raise ConnectionClosed("cannot connect to %s: %s" % (self.path, error)) from error
        self.sock.settimeout(timeout)
        self._buffer = bytearray()
        self._pending = []          # events, notices and unhandled vetoes read while waiting
        self._next_id = 1
        self._waiting = set()       # ids of requests waiting for their response
        self._responses = {}        # responses read for a request other than the one reading
        self._ops = {}              # request id -> op, for the error of its response
        self._veto_handlers = {}    # subscription number -> handler
        self.closed = False
        self.hello = self._read()
        if self.hello.get("type") != "hello":
            raise EvdError("bad_hello", "expected hello, got %r" % (self.hello,))
        self.session = self.hello.get("session")
        self.actor = self.hello.get("actor")

    def reconnect(self):
        """A new connection to the same daemon (after a `lagged` disconnect, say): a new session,
        whose subscriptions and veto handlers start empty; `last_seq` is kept, to resume from
        (`events(..., since=client.last_seq)`)."""
        self.close()
        self._connect()

    # -- the connection -------------------------------------------------------------------

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, message):
        data = (json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as error:
            self.close()
            raise ConnectionClosed("the connection to %s is closed: %s" % (self.path, error)) from error

    def _read(self):
        """The next message, blocking (up to the timeout); ConnectionClosed at the end."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                if line.strip():
                    return json.loads(line)
                continue
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.close()
                lagged = next((n for n in reversed(self.notices) if n.get("code") in ("lagged", "shutdown")), None)
                raise ConnectionClosed(notice=lagged)
            self._buffer += chunk

    def _dispatch(self, message):
        """Handles what can be handled at once: vetoes with a handler, notices. Returns the
        message when it is for the caller (an event, a notice, an unhandled veto)."""
        kind = message.get("type")
        if kind in ("event", "veto") and isinstance(message.get("seq"), int):
            if self.last_seq is None or message["seq"] > self.last_seq:
                self.last_seq = message["seq"]
        if kind == "veto":
            handler = self._veto_handlers.get(message.get("subscription"))
            if handler is not None:
                self._answer(handler, message)
                return None
        elif kind == "notice":
            self.notices.append(message)
            for handler in self._notice_handlers:
                handler(message)
            if not self._notice_handlers:
                code = message.get("code")
                level = (logging.DEBUG if code in ("caught_up", "snapshot_end")
                         else logging.INFO if code == "shutdown" else logging.WARNING)
                log.log(level, "evd notice: %s", json.dumps(message))
        return message

    def _answer(self, handler, veto):
        try:
            decision = _decision(handler(veto))
        except Exception as error:  # a policy that fails denies: the safe side
            log.exception("veto handler %r failed; denying", getattr(handler, "__name__", handler))
            decision = deny("%s failed: %s" % (getattr(handler, "__name__", "handler"), error))
        self.reply(veto["seq"], **decision)

    # -- requests -------------------------------------------------------------------------

    def request(self, op, **args):
        """Sends {"op": op, **args} and returns its result; raises EvdError for an error response.
        Events, notices and unhandled vetoes that arrive meanwhile are kept for events()/messages()."""
        return self.result(self.submit(op, **args))

    def submit(self, op, **args):
        """Sends {"op": op, **args} without waiting for its response; returns its id, for result().
        Requests on a connection are answered in order, so several may be in flight (pipelined)."""
        if "id" in args:
            raise TypeError("submit() numbers its requests itself; do not pass id")
        request_id = self._next_id
        self._next_id += 1
        message = {"op": op, "id": request_id}
        message.update(args)
        self._send(message)
        self._waiting.add(request_id)
        self._ops[request_id] = op
        return request_id

    def result(self, request_id):
        """The result of the request submit() returned `request_id` for, waiting for it; raises
        EvdError for an error response. Responses to other requests in flight are kept for theirs."""
        try:
            while request_id not in self._responses:
                message = self._read()
                if message.get("type") == "response":
                    if message.get("id") in self._waiting:
                        # Ours, another in flight, or an outer request's when a veto handler made this one.
                        self._responses[message["id"]] = message
                    else:
                        self._unexpected_response(message)
                    continue
                message = self._dispatch(message)
                if message is not None:
                    self._pending.append(message)
        finally:
            self._waiting.discard(request_id)
        message = self._responses.pop(request_id)
        op = self._ops.pop(request_id, None)
        if message.get("ok"):
            if isinstance(message.get("seq"), int):
                self.committed_seq = message["seq"]
            return message.get("result", {})
        raise EvdError.from_response(message.get("error"), op)

    def answered(self, request_id):
        """Whether the response to `request_id` (from submit()) has been read already."""
        return request_id in self._responses

    def _take_response(self, message):
        """A response read outside result(): kept for a request in flight (submit()), else unexpected."""
        if message.get("id") in self._waiting:
            self._responses[message["id"]] = message
        else:
            self._unexpected_response(message)

    def _unexpected_response(self, message):
        # The only responses not awaited are errors for invalid replies (ids "reply:SEQ").
        error = message.get("error") or {}
        log.warning("evd rejected %s: %s: %s", message.get("id"), error.get("code"), error.get("message"))
        self.notices.append({"type": "notice", "code": "reply_rejected", "id": message.get("id"), "error": error})

    def reply(self, seq, action, reason=None, set=None):
        """Answers the veto numbered `seq` (serve() and the decorator do this for you)."""
        message = {"op": "reply", "id": "reply:%d" % seq, "seq": seq, "action": action}
        if reason is not None:
            message["reason"] = reason
        if set is not None:
            message["set"] = set
        self._send(message)

    def ping(self):
        return self.request("ping")

    def execute(self, sql, params=None, **args):
        """execute: {"columns", "rows", "changes", "last_insert_rowid"}."""
        if params is not None:
            args["params"] = params
        return self.request("execute", sql=sql, **args)

    def emit(self, event, data=None):
        """Publishes a custom event (its name has a namespace: "myapp.deployed"); returns its seq."""
        args = {"event": event}
        if data is not None:
            args["data"] = data
        return self.request("emit", **args)["seq"]

    def subscribe(self, *events, **options):
        """subscribe; returns the result ({"subscription": N, "events": [...], "seq": HEAD}).
        Options as PROTOCOL.md §3: where, since, rows, name, on_overflow, veto, timeout_ms, ...,
        and cursor="NAME" for a durable cursor (docs/protocol.md, "Durable cursors")."""
        if events:
            options["events"] = list(events)
        return self.request("subscribe", **options)

    def unsubscribe(self, subscription):
        return self.request("unsubscribe", subscription=subscription)

    def ack(self, subscription, seq):
        """Acknowledges every event up to `seq` for the durable cursor that `subscription` follows
        (subscribe(..., cursor="NAME")); returns the cursor's position once it is on disk."""
        return self.request("ack", subscription=subscription, seq=seq)["position"]

    def wait(self, seq=None, timeout_ms=None):
        """Returns once every event up to `seq` has been delivered to this connection's
        subscriptions (they are then read before this returns: in self._pending for events());
        EvdError `timeout` otherwise. Read your writes: `seq` defaults to self.committed_seq, the
        last event a request of this client committed."""
        seq = self.committed_seq if seq is None else seq
        if seq is None:
            raise ValueError("wait(): no seq given, and no request of this client committed an event")
        args = {"seq": seq}
        if timeout_ms is not None:
            args["timeout_ms"] = timeout_ms
        return self.request("wait", **args)

    def delete_cursor(self, name):
        """Forgets a durable cursor nobody follows (yours, or anyone's with admin)."""
        return self.request("delete_cursor", cursor=name)

    # -- reading --------------------------------------------------------------------------

    def messages(self):
        """Yields every event, notice and unhandled veto, in order, until the connection ends
        (answering handled vetoes on the way). Ends quietly when the daemon closes."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            try:
                message = self._read()
            except ConnectionClosed:
                return
            if message.get("type") == "response":
                self._take_response(message)
                continue
            message = self._dispatch(message)
            if message is not None:
                yield message

    def events(self, *names, **options):
        """Subscribes to `names` (names or globs; with options as subscribe()) and yields each event.
        With no names it subscribes to nothing and yields the events of existing subscriptions.
        The subscription is made before events() returns, so nothing that happens after the call
        is missed. Ends when the connection does (a `lagged` or `shutdown` notice is then in
        self.notices)."""
        if names or options:
            self.subscribe(*names, **options)  # now, not at the first next()
        return (message for message in self.messages() if message.get("type") == "event")

    def snapshot_and_follow(self, table, events=("insert-rows", "upsert-rows", "update-row", "delete-row"),
                            database=None, **options):
        """A table's rows now, then every change after them, with no gap and no duplicate
        (docs/protocol.md, "Snapshot then stream"). Yields, in order:

            ("row", row)       each row of the table as it is (a dict, values decoded)
            ("end", seq)       once: the snapshot is complete, as of seq
            ("event", event)   each committed event after seq that `events` names, with its row
                               images (`rows`, `before`, `after`) decoded, live from then on

        A ("caught_up", seq) item marks where the stream reached live delivery. A consumer slower
        than the writers is cut off by evd (notice `lagged`): it resumes on a new connection after
        the last event it received, from the journal, so that nothing is missed or repeated. Ends
        when the connection does otherwise. `options` as subscribe() (where, name, ...).
        examples/mirror.py keeps a copy of a table with it."""
        args = dict(options, snapshot=table, rows=True)
        if database is not None:
            args["database"] = database
        result = self.subscribe(*events, **args)
        subscription = result["subscription"]
        while True:
            yield from self._follow(subscription)
            # The connection ended. Cut off for lagging behind: resume after the last event received
            # (the journal has the rest), on a new connection; anything else ends the stream.
            lagged = next((n for n in reversed(self.notices) if n.get("code") == "lagged"), None)
            if lagged is None or lagged.get("subscription") != subscription or self.last_seq is None:
                return
            log.info("resuming after seq %s on a new connection (the subscription lagged)", self.last_seq)
            self.notices.remove(lagged)
            self.reconnect()
            subscription = self.subscribe(*events, since=self.last_seq, rows=True, **options)["subscription"]

    def _follow(self, subscription):
        for message in self.messages():
            if message.get("subscription") != subscription:
                continue
            kind = message.get("type")
            if kind == "event" and message.get("event") == "snapshot-rows":
                for row in message.get("rows", []):
                    yield "row", decode_row(row)
            elif kind == "event":
                for key in ("before", "after"):
                    if isinstance(message.get(key), dict):
                        message[key] = decode_row(message[key])
                if isinstance(message.get("rows"), list):
                    message["rows"] = [decode_row(row) for row in message["rows"]]
                yield "event", message
            elif kind == "notice" and message.get("code") == "snapshot_end":
                yield "end", message["seq"]
            elif kind == "notice" and message.get("code") == "caught_up":
                yield "caught_up", message["seq"]
            elif kind == "notice" and message.get("code") == "snapshot_failed":
                raise EvdError.from_response(message.get("error"), "subscribe")

    # -- handlers -------------------------------------------------------------------------

    def veto(self, *names, **options):
        """Decorator: subscribes as a veto listener for `names` and answers each veto with the
        decorated function's decision. Options as subscribe(): name, priority, timeout_ms,
        on_timeout, mode ("dry_run"), where. The function gets `.subscription`."""
        if not names:
            raise TypeError("veto() needs at least one event name")

        def register(handler):
            result = self.request("subscribe", veto=list(names), **options)
            self._veto_handlers[result["subscription"]] = handler
            handler.subscription = result["subscription"]
            # Vetoes for it may have arrived before the response said its number.
            for message in list(self._pending):
                if message.get("type") == "veto" and message.get("subscription") == result["subscription"]:
                    self._pending.remove(message)
                    self._answer(handler, message)
            return handler

        return register

    def on_notice(self, handler):
        """Decorator: calls handler(notice) for each notice (lagged, gap, caught_up, shutdown)."""
        self._notice_handlers.append(handler)
        return handler

    def serve(self, count=None):
        """Reads until the connection ends (or `count` vetoes were answered), answering vetoes with
        their handlers. Events and notices read meanwhile are kept for events()/messages().
        Returns the number of vetoes answered."""
        answered = 0
        while count is None or answered < count:
            try:
                message = self._read()
            except ConnectionClosed:
                break
            if message.get("type") == "response":
                self._take_response(message)
                continue
            if message.get("type") == "veto" and message.get("subscription") in self._veto_handlers:
                answered += 1
            message = self._dispatch(message)
            if message is not None:
                self._pending.append(message)
        return answered


def connect(path=None, timeout=None):
    """Client(path, timeout): a connection to evd."""
    return Client(path, timeout=timeout)
