'use strict';
// WatchOnline from Node: a snapshot, then joins and leaves (one made by the
// Python client), the `watch` command, deadlines, aborting, and reconnecting
// after the server restarts. Nothing sleeps: each watch has a deadline, and a
// test waits by reading events until the one it expects.

const assert = require('node:assert/strict');
const { execFile, spawn } = require('node:child_process');
const path = require('node:path');
const readline = require('node:readline');
const { after, before, describe, it } = require('node:test');
const { promisify } = require('node:util');
const { PresenceClient, status } = require('../presence');
const { TARGET, OPTIONS, Replica, joined, left, rejection, unique, until } = require('./helpers');

const PYTHON = process.env.PRESENCE_PYTHON || 'python3'; // one with grpcio: scripts/test-clients says which
const PYTHON_CLI = path.join(__dirname, '..', '..', 'python', 'presence_client.py');
const NODE_CLI = path.join(__dirname, '..', 'presence.js');

// The first event of a watch of a room where only `users` are online.
const snapshot = (users) => ({
  type: 'snapshot',
  users,
  guests: [],
  userCount: users.length,
  guestCount: 0,
  resync: false,
});

describe('Presence from Node: watching', () => {
  let presence;

  before(() => {
    assert.ok(TARGET, 'PRESENCE_TARGET is unset: run scripts/test-clients, or set it to host:port');
    presence = new PresenceClient(TARGET, OPTIONS);
  });

  after(() => presence?.close());

  it('starts with a snapshot, then gets a join made from Python', async () => {
    const room = unique();
    const [early, fromPython] = [`${room}-early`, `${room}-from-python`];
    await presence.reportUser(early, { room });
    const watch = presence.watchOnline({ room, deadlineMs: 15_000 });
    try {
      const { value: first } = await watch.next();
      assert.deepEqual(first, snapshot([early]));

      await promisify(execFile)(PYTHON, [PYTHON_CLI, '--target', TARGET, 'user', fromPython, '--room', room]);
      let event = await until(watch, joined({ users: [fromPython] }));
      assert.equal(event.type, 'changes');
      assert.deepEqual(event.joinedUsers, [fromPython]);
      assert.deepEqual([event.userCount, event.guestCount], [2, 0]);

      await presence.leave({ usernames: [early], room });
      event = await until(watch, left({ users: [early] }));
      assert.deepEqual([event.userCount, event.guestCount], [1, 0]);
    } finally {
      await watch.return(); // ends the stream
    }
  });

  it('keeps its deadline', async () => {
    const watch = presence.watchOnline({ room: unique(), deadlineMs: 500 });
    assert.equal((await watch.next()).value.type, 'snapshot');
    const error = await rejection(watch.next()); // nothing happens in this room
    assert.equal(error.code, status.DEADLINE_EXCEEDED, error.message);
  });

  it('ends when its signal aborts', async () => {
    const stop = new AbortController();
    const watch = presence.watchOnline({ room: unique(), deadlineMs: 15_000, signal: stop.signal });
    assert.equal((await watch.next()).value.type, 'snapshot');
    const next = watch.next();
    stop.abort();
    assert.deepEqual(await next, { value: undefined, done: true });
  });

  it('does not retry a bad room', async () => {
    const error = await rejection(presence.watchOnline({ room: 'bell\u0007', deadlineMs: 5000 }).next());
    assert.equal(error.code, status.INVALID_ARGUMENT, error.message);
    assert.match(error.details, /room/);
  });

  it('reconnects after its server restarts, and starts again from a snapshot', async (t) => {
    if (OPTIONS.token) return t.skip('a replica runs plaintext: the plaintext run covers it');
    const room = unique();
    const [before, afterwards] = [`${room}-before`, `${room}-after`];
    const replica = new Replica();
    await replica.start();
    const watching = new PresenceClient(replica.target);
    const reconnects = [];
    const onReconnect = (error) => reconnects.push(error.code);
    const watch = watching.watchOnline({ room, deadlineMs: 30_000, onReconnect });
    try {
      assert.deepEqual((await watch.next()).value, snapshot([]));
      await presence.reportUser(before, { room }); // through the other server: replicas share Redis
      await until(watch, joined({ users: [before] }));

      await replica.stop(); // SIGTERM: the stream ends with UNAVAILABLE
      await replica.start(); // on the same port
      assert.deepEqual((await watch.next()).value, snapshot([before]));
      assert.ok(reconnects.length >= 1 && reconnects.every((code) => code === status.UNAVAILABLE), String(reconnects));
      await presence.reportUser(afterwards, { room });
      await until(watch, joined({ users: [afterwards] }));
    } finally {
      await watch.return();
      watching.close();
      await replica.stop();
    }
  });

  it('prints joins and leaves from the command line', async () => {
    const room = unique();
    const child = spawn(process.execPath, [NODE_CLI, '--target', TARGET, 'watch', '--room', room], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const lines = readline.createInterface({ input: child.stdout })[Symbol.asyncIterator]();
    const exited = new Promise((resolve) => child.on('exit', resolve));
    // Reads lines until `wanted`, for at most 10 s.
    const expect = async (wanted) => {
      const seen = [];
      const timeout = AbortSignal.timeout(10_000);
      while (!timeout.aborted) {
        const next = await Promise.race([
          lines.next(),
          new Promise((resolve) => timeout.addEventListener('abort', () => resolve({ done: true }))),
        ]);
        if (next.done) break;
        if (next.value === wanted) return;
        seen.push(next.value);
      }
      assert.fail(`no line ${JSON.stringify(wanted)}; got ${JSON.stringify(seen)}`);
    };
    try {
      await expect('= 0 users, 0 guests online'); // the snapshot: it is watching
      await presence.reportUser(`${room}-ann`, { room });
      await expect(`+ user ${room}-ann`);
      await presence.reportGuest('192.0.2.78', { room });
      await expect('+ guest 192.0.2.78');
      await expect('= 1 users, 1 guests online');
      await presence.leave({ usernames: [`${room}-ann`], room });
      await expect(`- user ${room}-ann`);
      await expect('= 0 users, 1 guests online');
    } finally {
      child.kill('SIGINT');
      assert.equal(await exited, 130);
    }
  });
});
