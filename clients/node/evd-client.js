#!/usr/bin/env node
// A small evd client for Node.js with nothing but the standard library (`net`).
//
//   node evd-client.js [--count N] [EVENT...]     subscribe (default: every event), print each as JSON
//   node evd-client.js --sql "select 40 + 2"      one request: print its result and exit
//
// The socket is found as every evd program finds it: $EVD_SOCKET, $RUNTIME_DIRECTORY/evd.sock,
// $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock. As a module: `const { EvdClient } = require(...)`.
'use strict';

const net = require('net');

function socketPath(env = process.env) {
  if (env.EVD_SOCKET) return env.EVD_SOCKET;
  if (env.RUNTIME_DIRECTORY) return env.RUNTIME_DIRECTORY.split(':')[0] + '/evd.sock';
  if (env.XDG_RUNTIME_DIR) return env.XDG_RUNTIME_DIR + '/evd.sock';
  return `/tmp/evd-${process.getuid()}/evd.sock`;
}

// Refuses a socket whose directory another user could have made or can write: their socket there
// would get this client's token and requests (PROTOCOL.md §1). The default /tmp/evd-$UID must be a
// real directory owned by this user and writable by nobody else; any other directory that others
// can write must be sticky and root's or this user's.
function checkSocketDirectory(path) {
  const fs = require('fs');
  const directory = require('path').dirname(path);
  const isDefault = path === `/tmp/evd-${process.getuid()}/evd.sock`;
  let info;
  try {
    info = isDefault ? fs.lstatSync(directory) : fs.statSync(directory);
  } catch (error) {
    if (error.code === 'ENOENT') return;  // no socket there either: connecting says so
    throw error;
  }
  const me = process.geteuid();
  const mode = info.mode & 0o7777;
  const othersWrite = (mode & 0o022) !== 0;
  let problem = null;
  if (info.isSymbolicLink()) problem = 'it is a symlink, not a directory; another user may have placed it to intercept evd\'s socket';
  else if (!info.isDirectory()) problem = 'it is not a directory';
  else if (isDefault && info.uid !== me) problem = `it belongs to uid ${info.uid}, not to uid ${me}; another user may have made it to intercept evd's socket (remove it, or set EVD_SOCKET)`;
  else if (isDefault && othersWrite) problem = `its mode 0${mode.toString(8)} lets other users replace the socket in it (chmod 700 it)`;
  else if (othersWrite && !((mode & 0o1000) && (info.uid === 0 || info.uid === me))) problem = `its mode 0${mode.toString(8)} (owner uid ${info.uid}) lets other users replace the socket in it with their own`;
  if (problem) throw new Error(`refusing the socket directory ${directory}: ${problem}`);
}

class EvdError extends Error {
  constructor(error) {
    super(`${error.code}: ${error.message}`);
    this.code = error.code;
    this.details = error;
  }
}

// One connection: request() returns a promise of the result; 'event', 'veto' and 'notice' are
// emitted for the other messages; 'hello' once connected.
class EvdClient extends require('events').EventEmitter {
  constructor(path = socketPath()) {
    super();
    this.nextId = 1;
    this.waiting = new Map();   // id -> {resolve, reject}
    this.buffer = '';
    checkSocketDirectory(path);
    this.socket = net.createConnection(path);
    this.socket.setEncoding('utf8');
    this.ready = new Promise((resolve, reject) => {
      this.once('hello', resolve);
      this.socket.once('error', reject);
    });
    this.socket.on('data', (chunk) => this.receive(chunk));
    this.socket.on('close', () => {
      for (const { reject } of this.waiting.values()) reject(new Error('evd closed the connection'));
      this.waiting.clear();
      this.emit('close');
    });
    this.socket.on('error', (error) => this.emit('socket-error', error));
  }

  receive(chunk) {
    this.buffer += chunk;
    let newline;
    while ((newline = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + 1);
      if (line.trim() === '') continue;
      const message = JSON.parse(line);
      if (message.type === 'response') {
        const waiter = this.waiting.get(message.id);
        if (!waiter) continue;
        this.waiting.delete(message.id);
        if (message.ok) waiter.resolve(message.result);
        else waiter.reject(new EvdError(message.error));
      } else {
        this.emit(message.type, message);
      }
    }
  }

  request(op, args = {}) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.socket.write(JSON.stringify({ ...args, op, id }) + '\n');
    });
  }

  reply(seq, action, extra = {}) {
    this.socket.write(JSON.stringify({ op: 'reply', seq, action, ...extra }) + '\n');
  }

  close() {
    this.socket.end();
    this.socket.destroy();
  }
}

async function main(argv) {
  let count = 0;
  let sql = null;
  const events = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--count') count = Number(argv[++i]);
    else if (argv[i] === '--sql') sql = argv[++i];
    else events.push(argv[i]);
  }

  const client = new EvdClient();
  const hello = await client.ready;
  if (sql !== null) {
    try {
      console.log(JSON.stringify(await client.request('execute', { sql })));
      client.close();
    } catch (error) {
      console.error(`evd-client: ${error.message}`);
      client.close();
      process.exitCode = 1;
    }
    return;
  }

  let seen = 0;
  client.on('event', (event) => {
    console.log(JSON.stringify(event));
    if (count > 0 && ++seen >= count) client.close();
  });
  client.on('notice', (notice) => console.error(`evd-client: notice ${JSON.stringify(notice)}`));
  const result = await client.request('subscribe', { events: events.length ? events : ['*'] });
  console.error(`evd-client: session ${hello.session}, subscription ${result.subscription}`);
}

// Values (docs/protocol.md, "Values"): a BLOB is {"$base64": ...}, ±Infinity {"$real": "Infinity"}
// or {"$real": "-Infinity"}, TEXT that is not valid UTF-8 {"$text_base64": ...}. decodeValue makes
// them a Buffer, ±Infinity and a TextBytes (the text's exact bytes, which no JS string can hold);
// encodeValue makes them parameters again, so a value read can be written back unchanged.
// (JSON.parse reads an integer beyond 2^53 inexactly: evd writes it exactly, in emit data.)
class TextBytes {
  constructor(bytes) { this.bytes = Buffer.from(bytes); }
  toString() { return this.bytes.toString('utf8'); }
}

function decodeValue(value) {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return value;
  const keys = Object.keys(value);
  if (keys.length !== 1) return value;
  if (keys[0] === '$base64') return Buffer.from(value.$base64, 'base64');
  if (keys[0] === '$real' && value.$real === 'Infinity') return Infinity;
  if (keys[0] === '$real' && value.$real === '-Infinity') return -Infinity;
  if (keys[0] === '$text_base64') return new TextBytes(Buffer.from(value.$text_base64, 'base64'));
  return value;
}

function encodeValue(value) {
  if (value instanceof TextBytes) return { $text_base64: value.bytes.toString('base64') };
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return { $base64: Buffer.from(value).toString('base64') };
  if (value === Infinity) return { $real: 'Infinity' };
  if (value === -Infinity) return { $real: '-Infinity' };
  return value;
}

module.exports = { EvdClient, EvdError, TextBytes, decodeValue, encodeValue, socketPath, checkSocketDirectory };

if (require.main === module) {
  process.stdout.on('error', () => process.exit(0));  // `| head -1`
  main(process.argv.slice(2)).catch((error) => {
    console.error(`evd-client: ${error.message}`);
    process.exit(1);
  });
}
