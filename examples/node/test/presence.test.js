'use strict';
// The Node client against a running Presence server (PRESENCE_TARGET).
// Run: PRESENCE_TARGET=127.0.0.1:50051 node --test   (scripts/test-clients does it all)

const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const { after, before, describe, it } = require('node:test');
const { promisify } = require('node:util');
const { PresenceClient, status } = require('../presence');
const { TARGET, OPTIONS, byBytes, everyone, randomGroup, randomIpv4, rejection, unique } = require('./helpers');

describe('Presence from Node', () => {
  let presence;

  before(() => {
    assert.ok(TARGET, 'PRESENCE_TARGET is unset: run scripts/test-clients, or set it to host:port');
    presence = new PresenceClient(TARGET, OPTIONS);
  });

  after(() => presence?.close());

  it('lists a reported user', async () => {
    const name = `${unique()}-alice`;
    await presence.reportUser(name);
    assert.ok((await everyone(presence)).users.includes(name));
  });

  it('lists guests in canonical form', async () => {
    const v4 = randomIpv4();
    const group = randomGroup();
    await presence.reportGuest(`::ffff:${v4}`);
    await presence.reportGuest(`2001:DB8:${group.toString(16).toUpperCase()}::0001`);
    const { guests } = await everyone(presence);
    assert.ok(guests.includes(v4), `${v4} not in ${guests}`);
    assert.ok(guests.includes(`2001:db8:${group.toString(16)}::1`));
    assert.ok(!guests.includes(`::ffff:${v4}`));
  });

  for (const [why, username] of [
    ['empty', ''],
    ['leading space', ` ${unique()}`],
    ['control character', `${unique()}\u0000`],
    ['over 256 bytes', `${unique()}${'ü'.repeat(125)}`],
  ]) {
    it(`rejects a username that is ${why}, naming the field`, async () => {
      const error = await rejection(presence.reportUser(username));
      assert.equal(error.code, status.INVALID_ARGUMENT, error.message);
      assert.match(error.details, /username/);
    });
  }

  it('rejects an address with a port, naming the field', async () => {
    const error = await rejection(presence.reportGuest('1.2.3.4:80'));
    assert.equal(error.code, status.INVALID_ARGUMENT, error.message);
    assert.match(error.details, /ip_address/);
  });

  it('stores a batch whole, or nothing of it', async () => {
    const prefix = unique();
    const v4 = randomIpv4();
    await presence.reportBatch({ usernames: [`${prefix}-b`, `${prefix}-a`], ipAddresses: [v4] });
    let online = await everyone(presence);
    assert.ok(online.users.includes(`${prefix}-a`) && online.users.includes(`${prefix}-b`));
    assert.ok(online.guests.includes(v4));

    const other = randomIpv4();
    const error = await rejection(presence.reportBatch({ usernames: [`${prefix}-c`], ipAddresses: [other, 'nope'] }));
    assert.equal(error.code, status.INVALID_ARGUMENT, error.message);
    assert.match(error.details, /ip_addresses/);
    online = await everyone(presence);
    assert.ok(!online.users.includes(`${prefix}-c`) && !online.guests.includes(other));
  });

  it('sorts both lists by bytes', async () => {
    const prefix = unique();
    const names = [`${prefix}-é`, `${prefix}-b`, `${prefix}-Z`, `${prefix}-a`];
    for (const name of names) await presence.reportUser(name);
    await presence.reportGuest(randomIpv4());
    await presence.reportGuest(`2001:db8::${randomGroup().toString(16)}`);
    const { users, guests } = await everyone(presence);
    assert.deepEqual(users, byBytes(users));
    assert.deepEqual(guests, byBytes(guests));
    assert.deepEqual(users.filter((user) => user.startsWith(prefix)), byBytes(names));
  });

  it('holds `limit` names of each kind in a page, with the counts of everyone', async () => {
    const prefix = unique();
    for (const name of ['a', 'b', 'c']) await presence.reportUser(`${prefix}-${name}`);
    await presence.reportGuest(randomIpv4());
    await presence.reportGuest(randomIpv4());
    const walked = await everyone(presence);
    assert.equal(typeof walked.userCount, 'number');
    assert.equal(walked.userCount, walked.users.length);
    assert.equal(walked.guestCount, walked.guests.length);
    assert.ok(walked.userCount >= 3 && walked.guestCount >= 2);

    const firstTwo = await presence.listOnline({ limit: 2 });
    assert.deepEqual(firstTwo.users, walked.users.slice(0, 2));
    assert.deepEqual(firstTwo.guests, walked.guests.slice(0, 2));
    assert.equal(firstTwo.userCount, walked.userCount);
    assert.equal(firstTwo.guestCount, walked.guestCount);
    assert.ok(firstTwo.nextPageToken);
  });

  it('fails fast with UNAVAILABLE when nothing listens', async () => {
    const port = await new Promise((resolve) => {
      const probe = net.createServer().listen(0, '127.0.0.1', () => {
        const { port } = probe.address();
        probe.close(() => resolve(port));
      });
    });
    const nowhere = new PresenceClient(`127.0.0.1:${port}`, { deadlineMs: 5000 });
    const started = Date.now();
    try {
      const error = await rejection(nowhere.listOnline());
      assert.equal(error.code, status.UNAVAILABLE, error.message);
      assert.ok(Date.now() - started < 2000, `took ${Date.now() - started} ms`);
    } finally {
      nowhere.close();
    }
  });

  it('is refused without the token by a server with tokens on', async (t) => {
    if (!OPTIONS.token) return t.skip('the server runs without tokens');
    const anonymous = new PresenceClient(TARGET, { caFile: OPTIONS.caFile });
    try {
      const error = await rejection(anonymous.listOnline());
      assert.equal(error.code, status.UNAUTHENTICATED, error.message);
    } finally {
      anonymous.close();
    }
  });

  it('reports and lists from the command line', async () => {
    const run = promisify(execFile);
    const cli = path.join(__dirname, '..', 'presence.js');
    const name = `${unique()}-cli`;
    await run(process.execPath, [cli, '--target', TARGET, 'user', name]);
    const { stdout } = await run(process.execPath, [cli, '--target', TARGET, 'list', '--all']);
    assert.ok(JSON.parse(stdout).users.includes(name));
    const error = await rejection(run(process.execPath, [cli, '--target', TARGET, 'user', ' bad']));
    assert.equal(error.code, 1);
    assert.match(error.stderr, /INVALID_ARGUMENT/);
  });
});
