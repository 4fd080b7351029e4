'use strict';
// Paging, counts, checks, leave and rooms from Node, against a real server
// (PRESENCE_TARGET). Most tests work in a room of their own, so that what they
// assert on is exact, whatever else is online on the site.

const assert = require('node:assert/strict');
const { after, before, describe, it } = require('node:test');
const { PresenceClient, status } = require('../presence');
const { TARGET, OPTIONS, byBytes, everyone, online, randomGroup, randomIpv4, rejection, unique } = require('./helpers');

const names = (prefix, count) => Array.from({ length: count }, (_, i) => `${prefix}-${String(i).padStart(4, '0')}`);

async function allRooms(presence, order, limit) {
  const rooms = [];
  let pageToken = '';
  do {
    const page = await presence.listRooms({ limit, pageToken, order });
    assert.ok(page.rooms.length <= limit);
    rooms.push(...page.rooms);
    pageToken = page.nextPageToken;
  } while (pageToken);
  return rooms;
}

describe('Presence from Node: paging, counts, checks, leave, rooms', () => {
  let presence;

  before(() => {
    assert.ok(TARGET, 'PRESENCE_TARGET is unset: run scripts/test-clients, or set it to host:port');
    presence = new PresenceClient(TARGET, OPTIONS);
  });

  after(() => presence?.close());

  it('walks every name exactly once, in order, a small page at a time', async () => {
    const room = unique();
    const users = names(room, 260);
    const group = randomGroup().toString(16);
    const guests = Array.from({ length: 40 }, (_, i) => `2001:db8:${group}::${(i + 1).toString(16)}`);
    await presence.reportBatch({ usernames: users, ipAddresses: guests, room });

    const pages = [];
    for await (const page of presence.iterOnline({ room, pageSize: 7 })) pages.push(page);
    assert.deepEqual(pages.flatMap((page) => page.users), byBytes(users));
    assert.deepEqual(pages.flatMap((page) => page.guests), byBytes(guests));
    for (const page of pages) {
      assert.ok(page.users.length <= 7 && page.guests.length <= 7);
      assert.deepEqual([page.userCount, page.guestCount], [260, 40]);
    }
    assert.ok(pages.slice(0, -1).every((page) => page.nextPageToken));
    assert.equal(pages.at(-1).nextPageToken, '');

    // A limit of 0 is the default page, 100.
    const first = await presence.listOnline({ room });
    assert.deepEqual(first.users, byBytes(users).slice(0, 100));
    // On the site, among everyone else, each of them still comes exactly once.
    const site = await everyone(presence, { pageSize: 50 });
    assert.deepEqual(site.users.filter((user) => user.startsWith(room)).sort(), [...users].sort());
  });

  it('rejects a bad page token, naming the field', async () => {
    const error = await rejection(presence.listOnline({ pageToken: 'not-a-token' }));
    assert.equal(error.code, status.INVALID_ARGUMENT, error.message);
    assert.match(error.details, /page_token/);
  });

  it('counts who is online in a room', async () => {
    const room = unique();
    await presence.reportBatch({ usernames: names(room, 3), ipAddresses: [randomIpv4(), randomIpv4()], room });
    await presence.reportUser(`${room}-0000`, { room }); // again: still one
    assert.deepEqual(await presence.countOnline({ room }), { userCount: 3, guestCount: 2 });
    assert.deepEqual(await presence.countOnline({ room: `${room}-empty` }), { userCount: 0, guestCount: 0 });
    const site = await presence.countOnline();
    assert.ok(site.userCount >= 3 && site.guestCount >= 2);
  });

  it('checks who is online, in request order, with when each user was last seen', async () => {
    const prefix = unique();
    const [seen, never] = [`${prefix}-seen`, `${prefix}-never`];
    const [v4, absent] = [randomIpv4(), randomIpv4()];
    await presence.reportUser(seen);
    await presence.reportGuest(v4);

    const { users, guests } = await presence.checkOnline({
      usernames: [never, seen],
      ipAddresses: [`::FFFF:${v4}`, absent],
    });
    assert.deepEqual(users.map((u) => [u.username, u.online]), [[never, false], [seen, true]]);
    assert.equal(users[0].lastSeen, null);
    assert.ok(users[1].lastSeen instanceof Date);
    // A sanity bound, not a timing assertion: it catches seconds read as milliseconds.
    assert.ok(Math.abs(Date.now() - users[1].lastSeen.getTime()) < 3600_000, String(users[1].lastSeen));
    assert.deepEqual(guests, [
      { ipAddress: v4, online: true },
      { ipAddress: absent, online: false },
    ]);

    const error = await rejection(presence.checkOnline({ usernames: [seen, ' bad'] }));
    assert.equal(error.code, status.INVALID_ARGUMENT, error.message);
    assert.match(error.details, /usernames\[1\]/);
  });

  it('leaves at once, keeps last seen, and lists again after a later report', async () => {
    const [user, guest] = [`${unique()}-bye`, randomIpv4()];
    await presence.reportUser(user);
    await presence.reportGuest(guest);
    assert.ok(await online(presence, { usernames: [user], ipAddresses: [guest] }));

    await presence.leave({ usernames: [user], ipAddresses: [guest] });
    const { users, guests } = await presence.checkOnline({ usernames: [user], ipAddresses: [guest] });
    assert.ok(!users[0].online && !guests[0].online);
    assert.ok(users[0].lastSeen instanceof Date, 'Leave keeps last seen');
    let walked = await everyone(presence);
    assert.ok(!walked.users.includes(user) && !walked.guests.includes(guest));

    await presence.reportUser(user);
    await presence.reportGuest(guest);
    walked = await everyone(presence);
    assert.ok(walked.users.includes(user) && walked.guests.includes(guest));
  });

  it('lists a report into a room in the room and on the site', async () => {
    const room = unique();
    const [user, guest] = [`${room}-in-room`, randomIpv4()];
    await presence.reportUser(user, { room });
    await presence.reportGuest(guest, { room });
    const inRoom = await presence.listOnline({ room });
    assert.deepEqual([inRoom.users, inRoom.guests], [[user], [guest]]);
    const site = await everyone(presence);
    assert.ok(site.users.includes(user) && site.guests.includes(guest));
    assert.ok(!(await online(presence, { usernames: [user], room: `${room}-other` })));
  });

  it('leaves one room only, or the site and every room', async () => {
    const room = unique();
    const user = `${room}-two-rooms`;
    await presence.reportUser(user, { room: `${room}-a` });
    await presence.reportUser(user, { room: `${room}-b` });
    await presence.leave({ usernames: [user], room: `${room}-a` });
    assert.ok(!(await online(presence, { usernames: [user], room: `${room}-a` })));
    assert.ok(await online(presence, { usernames: [user], room: `${room}-b` }));
    assert.ok(await online(presence, { usernames: [user] }));

    await presence.leave({ usernames: [user] });
    for (const where of ['', `${room}-a`, `${room}-b`]) {
      const still = await online(presence, { usernames: [user], room: where });
      assert.ok(!still, `still online in ${JSON.stringify(where)}`);
    }
  });

  it('lists rooms by name or busiest first, page by page', async () => {
    const prefix = unique();
    const users = { a: 1, b: 3, c: 2 };
    for (const [room, count] of Object.entries(users)) {
      await presence.reportBatch({ usernames: names(`${prefix}-${room}`, count), room: `${prefix}-${room}` });
    }
    await presence.reportGuest(randomIpv4(), { room: `${prefix}-a` }); // guests do not make a room busier
    const ours = (rooms) => rooms.filter((room) => room.name.startsWith(prefix));

    assert.deepEqual(
      ours(await allRooms(presence, 'name', 2)),
      ['a', 'b', 'c'].map((r) => ({ name: `${prefix}-${r}`, userCount: users[r], guestCount: r === 'a' ? 1 : 0 })),
    );
    const busiest = ours(await allRooms(presence, 'most_online', 2));
    assert.deepEqual(
      busiest.map((room) => room.name),
      ['b', 'c', 'a'].map((r) => `${prefix}-${r}`),
    );
    await assert.rejects(presence.listRooms({ order: 'busiest' }), RangeError);
  });

  it(
    'breaks ties by name when busiest first',
    async () => {
      const prefix = unique();
      for (const room of ['x', 'y', 'z']) {
        await presence.reportBatch({ usernames: names(`${prefix}-${room}`, 2), room: `${prefix}-${room}` });
      }
      const busiest = (await allRooms(presence, 'most_online', 2)).filter((room) => room.name.startsWith(prefix));
      assert.deepEqual(
        busiest.map((room) => room.name),
        ['x', 'y', 'z'].map((r) => `${prefix}-${r}`),
      );
    },
  );

  it('rejects a bad room, naming the field', async () => {
    const error = await rejection(presence.reportUser(`${unique()}-x`, { room: 'bell\u0007' }));
    assert.equal(error.code, status.INVALID_ARGUMENT, error.message);
    assert.match(error.details, /room/);
  });
});
