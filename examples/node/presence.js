#!/usr/bin/env node
'use strict';
// A small Node.js client for Presence (gRPC service presence.v1.Presence).
//
//   const { PresenceClient } = require('./presence');
//   const presence = new PresenceClient('localhost:50051');
//   await presence.reportUser('alice');                              // on the site
//   await presence.reportGuest('2001:db8::1', { room: 'forum/7' });  // in a room (and so on the site)
//   const page = await presence.listOnline({ limit: 10 });           // one page, and page.nextPageToken
//   for await (const page of presence.iterOnline({ room: 'forum/7' })) console.log(page.users);
//   await presence.countOnline();                                    // { userCount, guestCount }
//   await presence.checkOnline({ usernames: ['alice'] });            // online? lastSeen: a Date or null
//   await presence.leave({ usernames: ['alice'] });                  // a sign-out: off every list at once
//   await presence.listRooms({ order: 'most_online' });              // the busiest rooms first
//   for await (const event of presence.watchOnline({ room: 'forum/7' })) console.log(event);
//   presence.close();
//
// Every call takes `room` ('' = the whole site) and keeps a deadline
// (`deadlineMs`, 2 s unless told). The proto is loaded at run time with
// @grpc/proto-loader: nothing is generated. A failed call rejects with a
// grpc-js ServiceError: `error.code` is one of `status` below (INVALID_ARGUMENT
// for a bad name, address, room or page token, with the field named in
// `error.details`; UNAVAILABLE when Presence or its Redis is down or
// overloaded, and reports are idempotent, so a retry is safe).
//
// A secured server (TLS, tokens):
//   new PresenceClient('presence:50051', { token: TOKEN, caFile: 'ca.pem' })
// and for mutual TLS certFile and keyFile too. The token is sent as
// `authorization: Bearer TOKEN` on every call.
//
// From a shell:  node presence.js [--target HOST:PORT] COMMAND [--room R]
//   user NAME | guest IP | list [--limit N] [--page-token T] [--all] | count
//   | check --user NAME --guest IP | leave --user NAME | rooms [--order name|most_online] | watch
// (--token and --ca default to $PRESENCE_TOKEN and $PRESENCE_CA_FILE.)

const fs = require('node:fs');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_PATH = path.join(__dirname, '..', '..', 'proto', 'presence', 'v1', 'presence.proto');

const ORDERS = { name: 'ROOM_ORDER_NAME', most_online: 'ROOM_ORDER_MOST_ONLINE' };

const CHANNEL_OPTIONS = {
  // A watch can sit idle for hours. Pinging while a call is open is how a dead
  // server or a silently dropped connection shows up, as UNAVAILABLE (and the
  // watch reconnects), instead of a stream that waits forever.
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
};

function loadService(protoPath = PROTO_PATH) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: false, // JavaScript names: ipAddress, userCount
    longs: Number, // the uint64 counts as numbers, exact up to 2^53
    enums: String, // RoomOrder by name
    defaults: true, // an empty list as [], a zero count as 0, an unset message as null
    oneofs: true, // WatchOnlineResponse.event says which of snapshot and changes is set
  });
  return grpc.loadPackageDefinition(definition).presence.v1.Presence;
}

// Plaintext, or TLS trusting `caFile` (with a client certificate for mutual TLS).
function channelCredentials({ caFile, certFile, keyFile } = {}) {
  if (!caFile) return grpc.credentials.createInsecure();
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(caFile), read(keyFile), read(certFile));
}

class PresenceClient {
  constructor(
    target,
    { deadlineMs = 2000, protoPath = PROTO_PATH, credentials, channelOptions, token, caFile, certFile, keyFile } = {},
  ) {
    const Presence = loadService(protoPath);
    this.stub = new Presence(target, credentials ?? channelCredentials({ caFile, certFile, keyFile }), {
      ...CHANNEL_OPTIONS,
      ...channelOptions,
    });
    // Every call gets a deadline: without one a call to a hung server waits forever.
    this.deadlineMs = deadlineMs;
    // Sent with every call when the server wants tokens.
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
  }

  // --- Reporting -------------------------------------------------------------

  async reportUser(username, { room = '' } = {}) {
    await this.#call('ReportUser', { username, room });
  }

  async reportGuest(ipAddress, { room = '' } = {}) {
    await this.#call('ReportGuest', { ipAddress, room });
  }

  // All or nothing: one bad entry rejects the whole batch. At most 1000 entries.
  async reportBatch({ usernames = [], ipAddresses = [], room = '' } = {}) {
    await this.#call('ReportBatch', { usernames, ipAddresses, room });
  }

  // Takes visitors off the lists at once (a sign-out). Room '' means the site
  // and every room; a room means that room only. Last seen is kept.
  async leave({ usernames = [], ipAddresses = [], room = '' } = {}) {
    await this.#call('Leave', { usernames, ipAddresses, room });
  }

  // --- Reading ---------------------------------------------------------------

  // One page of each list, sorted ascending by bytes. `limit` is the page
  // size: 0 means the server's default (100), and it caps it at 1000.
  async listOnline({ limit = 0, pageToken = '', room = '' } = {}) {
    const reply = await this.#call('ListOnline', { limit, pageToken, room });
    const { users, guests, userCount, guestCount, nextPageToken } = reply;
    return { users, guests, userCount, guestCount, nextPageToken };
  }

  // Every page, in order; each call has its own deadline. A name online during
  // the whole walk comes exactly once; one that comes or goes may or may not.
  async *iterOnline({ room = '', pageSize = 0 } = {}) {
    let pageToken = '';
    do {
      const page = await this.listOnline({ limit: pageSize, pageToken, room });
      yield page;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  async countOnline({ room = '' } = {}) {
    const { userCount, guestCount } = await this.#call('CountOnline', { room });
    return { userCount, guestCount };
  }

  // Whether each one is online (in `room`), in request order, and when each
  // user was last seen anywhere on the site. At most 1000 entries.
  async checkOnline({ usernames = [], ipAddresses = [], room = '' } = {}) {
    const reply = await this.#call('CheckOnline', { usernames, ipAddresses, room });
    return {
      users: reply.users.map(({ username, online, lastSeen }) => ({
        username,
        online,
        lastSeen: lastSeen ? new Date(lastSeen.seconds * 1000 + Math.floor(lastSeen.nanos / 1e6)) : null,
      })),
      guests: reply.guests.map(({ ipAddress, online }) => ({ ipAddress, online })),
    };
  }

  // One page of the rooms with someone online: `order` is 'name' or
  // 'most_online' (most users first, ties by name). Keep the order while paging.
  async listRooms({ limit = 0, pageToken = '', order = 'name' } = {}) {
    if (!Object.hasOwn(ORDERS, order)) {
      throw new RangeError(`order must be one of ${Object.keys(ORDERS).join(', ')}, not ${JSON.stringify(order)}`);
    }
    const reply = await this.#call('ListRooms', { limit, pageToken, order: ORDERS[order] });
    return {
      rooms: reply.rooms.map(({ name, userCount, guestCount }) => ({ name, userCount, guestCount })),
      nextPageToken: reply.nextPageToken,
    };
  }

  // Follows who is online: an async iterator of events,
  //   { type: 'snapshot', users, guests, userCount, guestCount, resync }
  //   { type: 'changes', joinedUsers, leftUsers, joinedGuests, leftGuests, userCount, guestCount }
  // A snapshot (the first 1000 names of each kind) replaces whatever you knew.
  // When the stream ends with UNAVAILABLE (the server shut down, a connection
  // was aged out or dropped, the server is overloaded) it reconnects, backing
  // off from `retryInitialMs` to `retryMaxMs`, and goes on with a fresh
  // snapshot; `onReconnect(error)` hears of it. Any other error is thrown.
  // `deadlineMs` bounds the whole watch, reconnects included (unset: until
  // `signal` aborts or you stop iterating); past it, DEADLINE_EXCEEDED.
  async *watchOnline({ room = '', deadlineMs, signal, retryInitialMs = 100, retryMaxMs = 5000, onReconnect } = {}) {
    const deadline = deadlineMs === undefined ? Infinity : Date.now() + deadlineMs;
    let backoff = retryInitialMs;
    while (!signal?.aborted) {
      const call = this.stub.WatchOnline({ room }, this.metadata, { deadline });
      const cancel = () => call.cancel();
      signal?.addEventListener('abort', cancel, { once: true });
      // The error that ends the call is also emitted after we stop iterating
      // (the CANCELLED of a `break`): with no listener, it would crash the process.
      call.on('error', () => {});
      try {
        for await (const message of call) {
          const event = toEvent(message);
          if (event.type === 'snapshot') backoff = retryInitialMs; // connected: the next outage starts afresh
          yield event;
        }
        return; // the server never ends a watch with OK; if it did, the watch is over
      } catch (error) {
        if (signal?.aborted) return;
        if (error.code !== grpc.status.UNAVAILABLE) throw error;
        onReconnect?.(error);
      } finally {
        signal?.removeEventListener('abort', cancel);
        call.cancel(); // the caller may have stopped iterating (break): end the stream
      }
      // Jittered, so that the watchers of a restarted server come back spread out.
      try {
        await sleep(backoff * (0.5 + Math.random() / 2), undefined, { signal });
      } catch {
        return; // aborted while waiting
      }
      backoff = Math.min(backoff * 2, retryMaxMs);
    }
  }

  close() {
    this.stub.close();
  }

  #call(method, request) {
    return new Promise((resolve, reject) => {
      const options = { deadline: Date.now() + this.deadlineMs };
      this.stub[method](request, this.metadata, options, (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }
}

function toEvent({ event, snapshot, changes }) {
  if (event === 'snapshot') {
    const { users, guests, userCount, guestCount, resync } = snapshot;
    return { type: 'snapshot', users, guests, userCount, guestCount, resync };
  }
  const { joinedUsers, leftUsers, joinedGuests, leftGuests, userCount, guestCount } = changes;
  return { type: 'changes', joinedUsers, leftUsers, joinedGuests, leftGuests, userCount, guestCount };
}

// --- Command line -------------------------------------------------------------

const byBytes = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b));

// Prints joins and leaves as `+ user NAME`, `- guest IP`, each event followed
// by `= N users, M guests online`.
async function printWatch(events, write = (line) => process.stdout.write(`${line}\n`)) {
  let users = new Set();
  let guests = new Set();
  for await (const event of events) {
    let joinedUsers, leftUsers, joinedGuests, leftGuests;
    if (event.type === 'snapshot') {
      // A snapshot replaces what we knew (nothing, at first): print the
      // difference. It holds the first 1000 names of each kind only.
      const nowUsers = new Set(event.users);
      const nowGuests = new Set(event.guests);
      joinedUsers = event.users.filter((name) => !users.has(name));
      leftUsers = [...users].filter((name) => !nowUsers.has(name));
      joinedGuests = event.guests.filter((name) => !guests.has(name));
      leftGuests = [...guests].filter((name) => !nowGuests.has(name));
      [users, guests] = [nowUsers, nowGuests];
    } else {
      ({ joinedUsers, leftUsers, joinedGuests, leftGuests } = event);
      for (const name of joinedUsers) users.add(name);
      for (const name of leftUsers) users.delete(name);
      for (const name of joinedGuests) guests.add(name);
      for (const name of leftGuests) guests.delete(name);
    }
    for (const [sign, kind, names] of [
      ['-', 'user', leftUsers],
      ['+', 'user', joinedUsers],
      ['-', 'guest', leftGuests],
      ['+', 'guest', joinedGuests],
    ]) {
      for (const name of [...names].sort(byBytes)) write(`${sign} ${kind} ${name}`);
    }
    write(`= ${event.userCount} users, ${event.guestCount} guests online`);
  }
}

const USAGE = `usage: presence.js [--target HOST:PORT] COMMAND [--room R]
  user NAME | guest IP              report a signed-in user, or a guest by IP
  list [--limit N] [--page-token T] [--all]
                                    who is online, as JSON (--all: every page)
  count                             how many are online, as JSON
  check --user NAME --guest IP      who of these is online, as JSON (repeatable)
  leave --user NAME --guest IP      take these off the lists (a sign-out)
  rooms [--order name|most_online] [--limit N] [--page-token T]
                                    the rooms with someone online, as JSON
  watch                             print joins and leaves as they happen`;

async function main(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        target: { type: 'string', default: process.env.PRESENCE_TARGET || 'localhost:50051' },
        token: { type: 'string', default: process.env.PRESENCE_TOKEN || undefined },
        ca: { type: 'string', default: process.env.PRESENCE_CA_FILE || undefined },
        room: { type: 'string', default: '' },
        limit: { type: 'string', default: '0' },
        'page-token': { type: 'string', default: '' },
        all: { type: 'boolean', default: false },
        order: { type: 'string', default: 'name' },
        user: { type: 'string', multiple: true, default: [] },
        guest: { type: 'string', multiple: true, default: [] },
      },
    });
  } catch (error) {
    console.error(`${error.message}\n${USAGE}`);
    return 2;
  }
  const { values, positionals } = parsed;
  const [command, argument] = positionals;
  const { room, order } = values;
  const limit = Number(values.limit);
  const pageToken = values['page-token'];
  const names = { usernames: values.user, ipAddresses: values.guest, room };
  const show = (value) => console.log(JSON.stringify(value));

  const presence = new PresenceClient(values.target, { token: values.token, caFile: values.ca });
  try {
    if (command === 'user' && argument !== undefined) await presence.reportUser(argument, { room });
    else if (command === 'guest' && argument !== undefined) await presence.reportGuest(argument, { room });
    else if (command === 'list' && values.all) {
      const all = { users: [], guests: [], userCount: 0, guestCount: 0 };
      for await (const page of presence.iterOnline({ room, pageSize: limit })) {
        all.users.push(...page.users);
        all.guests.push(...page.guests);
        [all.userCount, all.guestCount] = [page.userCount, page.guestCount];
      }
      show(all);
    } else if (command === 'list') show(await presence.listOnline({ limit, pageToken, room }));
    else if (command === 'count') show(await presence.countOnline({ room }));
    else if (command === 'check') show(await presence.checkOnline(names));
    else if (command === 'leave') await presence.leave(names);
    else if (command === 'rooms' && Object.hasOwn(ORDERS, order)) {
      show(await presence.listRooms({ limit, pageToken, order }));
    }
    else if (command === 'watch') {
      const stop = new AbortController();
      process.once('SIGINT', () => stop.abort()); // Ctrl-C: end the watch, then exit 130
      const onReconnect = (error) => console.error(`presence: watch interrupted (${error.details}), reconnecting`);
      await printWatch(presence.watchOnline({ room, signal: stop.signal, onReconnect }));
      return stop.signal.aborted ? 130 : 0;
    } else {
      console.error(USAGE);
      return 2;
    }
    return 0;
  } catch (error) {
    if (error.code === undefined) throw error;
    console.error(`presence: ${grpc.status[error.code]}: ${error.details}`);
    return 1;
  } finally {
    presence.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { PresenceClient, PROTO_PATH, ORDERS, status: grpc.status, printWatch, main };
