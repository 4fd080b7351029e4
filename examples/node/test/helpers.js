'use strict';
// Shared by the test files (not a test file itself: npm test runs test/*.test.js).

const assert = require('node:assert/strict');
const { execFileSync, spawn } = require('node:child_process');
const crypto = require('node:crypto');
const { once } = require('node:events');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { PresenceClient } = require('../presence');

const TARGET = process.env.PRESENCE_TARGET;
// scripts/test-clients runs the suites once more against a server with TLS
// and tokens on: the CA to trust and a read token.
const OPTIONS = { token: process.env.PRESENCE_TOKEN || undefined, caFile: process.env.PRESENCE_CA_FILE || undefined };
const PRIVATE_REDIS = path.join(__dirname, '..', '..', '..', 'scripts', 'lib', 'private_redis.py');

// A prefix no other test or run uses, so tests never see each other's names.
const unique = () => `node-${crypto.randomBytes(6).toString('hex')}`;
const randomByte = () => crypto.randomInt(1, 255);
const randomIpv4 = () => `10.${randomByte()}.${randomByte()}.${randomByte()}`;
const randomGroup = () => crypto.randomInt(0x1000, 0xffff);
// The server's order: ascending by UTF-8 bytes.
const byBytes = (names) => [...names].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));

// Resolves to the gRPC error a call rejects with; fails if it succeeds.
async function rejection(promise) {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail('the call succeeded');
}

// Everyone online in `room`, every page walked into one (with the last page's counts).
async function everyone(presence, { room = '', pageSize = 0 } = {}) {
  const all = { users: [], guests: [], userCount: 0, guestCount: 0 };
  for await (const page of presence.iterOnline({ room, pageSize })) {
    all.users.push(...page.users);
    all.guests.push(...page.guests);
    [all.userCount, all.guestCount] = [page.userCount, page.guestCount];
  }
  return all;
}

// Whether all these users and guests are online in `room` (CheckOnline).
async function online(presence, { usernames = [], ipAddresses = [], room = '' }) {
  const { users, guests } = await presence.checkOnline({ usernames, ipAddresses, room });
  return [...users, ...guests].every((status) => status.online);
}

// Reads a watch until an event `shows` what the test waits for; returns it.
// The watch's deadline bounds the wait (DEADLINE_EXCEEDED).
async function until(watch, shows) {
  for (;;) {
    const { value, done } = await watch.next();
    assert.ok(!done, 'the watch ended');
    if (shows(value)) return value;
  }
}

// Shows these online: changes that have them join, or a resync snapshot that lists them.
const joined = ({ users = [], guests = [] }) => (event) =>
  event.type === 'snapshot'
    ? users.every((u) => event.users.includes(u)) && guests.every((g) => event.guests.includes(g))
    : users.every((u) => event.joinedUsers.includes(u)) && guests.every((g) => event.joinedGuests.includes(g));

// Shows these gone: changes that have them leave, or a resync snapshot without them.
const left = ({ users = [], guests = [] }) => (event) =>
  event.type === 'snapshot'
    ? !users.some((u) => event.users.includes(u)) && !guests.some((g) => event.guests.includes(g))
    : users.every((u) => event.leftUsers.includes(u)) && guests.every((g) => event.leftGuests.includes(g));

// Another Presence server on the same Redis and key prefix as the one at
// PRESENCE_TARGET: scripts/test-clients exports the server's environment
// (PRESENCE_BIN, PRESENCE_REDIS_URL, ...), and a replica differs only in its
// ports. A test may stop it and start it again on the same port.
class Replica {
  constructor() {
    assert.ok(
      process.env.PRESENCE_BIN && process.env.PRESENCE_REDIS_URL,
      'PRESENCE_BIN or PRESENCE_REDIS_URL is unset: run scripts/test-clients, which exports them',
    );
    // The project's one free-port picker.
    const [grpcPort, metricsPort] = execFileSync('python3', [PRIVATE_REDIS, 'free-port', '--count', '2'], {
      encoding: 'utf8',
    })
      .trim()
      .split(' ');
    this.target = `127.0.0.1:${grpcPort}`;
    this.env = { ...process.env, PRESENCE_LISTEN: this.target, PRESENCE_METRICS_LISTEN: `127.0.0.1:${metricsPort}` };
    this.log = '';
  }

  async start(timeoutMs = 30_000) {
    this.process = spawn(process.env.PRESENCE_BIN, [], { env: this.env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.exited = once(this.process, 'exit');
    for (const stream of [this.process.stdout, this.process.stderr]) {
      stream.on('data', (chunk) => (this.log += chunk));
    }
    const deadline = Date.now() + timeoutMs;
    const probe = new PresenceClient(this.target, { deadlineMs: 1000 });
    try {
      for (;;) {
        try {
          await probe.countOnline(); // answers once it serves, with its Redis
          return;
        } catch (error) {
          if (this.process.exitCode !== null || Date.now() > deadline) {
            throw new Error(`the replica did not start (${error.message}); its log:\n${this.log.slice(-2000)}`);
          }
        }
        await sleep(50); // a poll interval, bounded by the deadline above
      }
    } finally {
      probe.close();
    }
  }

  // SIGTERM, as Kubernetes does: watches end with UNAVAILABLE and the process exits.
  async stop() {
    if (!this.process || this.process.exitCode !== null || this.process.signalCode !== null) return;
    this.process.kill('SIGTERM');
    const killed = setTimeout(() => this.process.kill('SIGKILL'), 15_000);
    await this.exited;
    clearTimeout(killed);
  }
}

module.exports = {
  TARGET,
  OPTIONS,
  unique,
  randomIpv4,
  randomGroup,
  byBytes,
  rejection,
  everyone,
  online,
  until,
  joined,
  left,
  Replica,
};
