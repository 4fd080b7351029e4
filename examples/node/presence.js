#!/usr/bin/env node
'use strict';
// A small Node.js client for Presence (gRPC service presence.v1.Presence).
//
//   const { PresenceClient } = require('./presence');
//   const presence = new PresenceClient('localhost:50051');
//   await presence.reportUser('alice');
//   await presence.reportGuest('2001:db8::1');
//   const { users, guests, userCount, guestCount } = await presence.listOnline(10);
//   presence.close();
//
// The proto is loaded at run time with @grpc/proto-loader: nothing is generated.
// A failed call rejects with a grpc-js ServiceError: `error.code` is one of
// `status` below (INVALID_ARGUMENT for a bad name or address, with the field
// named in `error.details`; UNAVAILABLE when Presence or its Redis is down).
//
// From a shell:  node presence.js [--target HOST:PORT] user NAME | guest IP | list [--limit N]

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_PATH = path.join(__dirname, '..', '..', 'proto', 'presence', 'v1', 'presence.proto');

function loadService(protoPath = PROTO_PATH) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: false, // JavaScript names: ipAddress, userCount
    longs: Number, // the uint64 counts as numbers, exact up to 2^53
    defaults: true, // an empty list as [], a zero count as 0
  });
  return grpc.loadPackageDefinition(definition).presence.v1.Presence;
}

class PresenceClient {
  constructor(target, { deadlineMs = 2000, protoPath = PROTO_PATH, credentials } = {}) {
    const Presence = loadService(protoPath);
    this.stub = new Presence(target, credentials ?? grpc.credentials.createInsecure());
    // Every call gets a deadline: without one a call to a hung server waits forever.
    this.deadlineMs = deadlineMs;
  }

  async reportUser(username) {
    await this.#call('ReportUser', { username });
  }

  async reportGuest(ipAddress) {
    await this.#call('ReportGuest', { ipAddress });
  }

  // All or nothing: one bad entry rejects the whole batch.
  async reportBatch({ usernames = [], ipAddresses = [] } = {}) {
    await this.#call('ReportBatch', { usernames, ipAddresses });
  }

  // Users and guests sorted ascending by bytes; limit 0 means all.
  async listOnline(limit = 0) {
    const { users, guests, userCount, guestCount } = await this.#call('ListOnline', { limit });
    return { users, guests, userCount, guestCount };
  }

  close() {
    this.stub.close();
  }

  #call(method, request) {
    return new Promise((resolve, reject) => {
      const options = { deadline: Date.now() + this.deadlineMs };
      this.stub[method](request, options, (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }
}

async function main(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: 'string', default: process.env.PRESENCE_TARGET || 'localhost:50051' },
      limit: { type: 'string', default: '0' },
    },
  });
  const [command, argument] = positionals;
  const presence = new PresenceClient(values.target);
  try {
    if (command === 'user' && argument !== undefined) await presence.reportUser(argument);
    else if (command === 'guest' && argument !== undefined) await presence.reportGuest(argument);
    else if (command === 'list') console.log(JSON.stringify(await presence.listOnline(Number(values.limit))));
    else {
      console.error('usage: presence.js [--target HOST:PORT] user NAME | guest IP | list [--limit N]');
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

module.exports = { PresenceClient, PROTO_PATH, status: grpc.status, main };
