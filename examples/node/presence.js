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
// A secured server (TLS, tokens):
//   new PresenceClient('presence:50051', { token: TOKEN, caFile: 'ca.pem' })
// and for mutual TLS certFile and keyFile too. The token is sent as
// `authorization: Bearer TOKEN` on every call.
//
// From a shell:  node presence.js [--target HOST:PORT] user NAME | guest IP | list [--limit N]
// (--token and --ca default to $PRESENCE_TOKEN and $PRESENCE_CA_FILE.)

const fs = require('node:fs');
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

// TLS trusting caFile when given (with a client certificate for mutual
// TLS), else plaintext.
function channelCredentials({ caFile, certFile, keyFile } = {}) {
  if (!caFile) return grpc.credentials.createInsecure();
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(caFile), read(keyFile), read(certFile));
}

class PresenceClient {
  constructor(
    target,
    { deadlineMs = 2000, protoPath = PROTO_PATH, credentials, token, caFile, certFile, keyFile } = {},
  ) {
    const Presence = loadService(protoPath);
    this.stub = new Presence(target, credentials ?? channelCredentials({ caFile, certFile, keyFile }));
    // Every call gets a deadline: without one a call to a hung server waits forever.
    this.deadlineMs = deadlineMs;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
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
      this.stub[method](request, this.metadata, options, (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }
}

async function main(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: 'string', default: process.env.PRESENCE_TARGET || 'localhost:50051' },
      token: { type: 'string', default: process.env.PRESENCE_TOKEN || undefined },
      ca: { type: 'string', default: process.env.PRESENCE_CA_FILE || undefined },
      limit: { type: 'string', default: '0' },
    },
  });
  const [command, argument] = positionals;
  const presence = new PresenceClient(values.target, { token: values.token, caFile: values.ca });
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
