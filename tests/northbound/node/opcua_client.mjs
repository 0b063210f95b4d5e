// A node-opcua client against the twin's OPC UA server (tests/northbound/test_opcua_node_client.py).
//
// Usage: node opcua_client.mjs '<json options>'   (NODE_OPCUA_DIR = the folder node-opcua is
// installed in). Prints one JSON object per line on stdout, each with a "step"; log lines of
// node-opcua itself do not start with "{". Reads a line on stdin where the test must look at the
// gateway before the script goes on ("continue").
//
// Steps: anonymous (must be refused) → session (Basic256Sha256 SignAndEncrypt, user/password)
// → browse (Objects → <device> → <equipment>) → read (value, status, source timestamp, unit,
// range) → subscribed (first value; the test then changes the twin) → datachange → write_ok
// (waits for "continue") → write_out_of_range → done. Any failure: {"step": "error", ...}, exit 1.

import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import readline from "node:readline";

const require = createRequire(path.join(process.env.NODE_OPCUA_DIR, "package.json"));
const {
  AttributeIds,
  DataType,
  MessageSecurityMode,
  OPCUACertificateManager,
  OPCUAClient,
  SecurityPolicy,
  TimestampsToReturn,
  UserTokenPolicy,
  UserTokenType,
  makeBrowsePath,
  resolveNodeId,
} = require("node-opcua");

const opts = JSON.parse(process.argv[2]);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const stdinLines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function waitFor(word) {
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== word) throw new Error(`expected ${word} on stdin, got ${value}`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function makeClient(certificateManager) {
  const client = OPCUAClient.create({
    applicationName: "edgeos node-opcua test client",
    applicationUri: opts.applicationUri,
    certificateFile: opts.clientCert,
    privateKeyFile: opts.clientKey,
    clientCertificateManager: certificateManager,
    securityMode: MessageSecurityMode.SignAndEncrypt,
    securityPolicy: SecurityPolicy.Basic256Sha256,
    connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 500 },
    requestedSessionTimeout: 60_000,
  });
  await client.connect(opts.endpoint);
  return client;
}

async function childByName(session, nodeId, name) {
  const result = await session.browse(nodeId);
  const names = result.references.map((r) => r.browseName.name);
  const ref = result.references.find((r) => r.browseName.name === name);
  if (!ref) throw new Error(`${name} not among the children of ${nodeId}: ${names}`);
  return { nodeId: ref.nodeId, names };
}

// A property of a variable by its browse name ("EngineeringUnits", "<ns>:LastWriteOutcome").
async function property(session, nodeId, name) {
  const [result] = await session.translateBrowsePath([makeBrowsePath(nodeId, `.${name}`)]);
  if (!result.statusCode.isGood()) throw new Error(`${name}: ${result.statusCode.name}`);
  const dv = await session.read({ nodeId: result.targets[0].targetId, attributeId: AttributeIds.Value });
  return dv.value.value;
}

function writeValue(session, nodeId, value) {
  return session.write({
    nodeId,
    attributeId: AttributeIds.Value,
    value: { value: { dataType: DataType.Double, value } },
  });
}

async function main() {
  // The client's PKI: its own certificate comes from the test; the server's is trusted
  // explicitly (nothing is accepted automatically).
  const certificateManager = new OPCUACertificateManager({
    rootFolder: opts.pkiDir,
    automaticallyAcceptUnknownCertificate: false,
  });
  await certificateManager.initialize();
  const serverDer = new X509Certificate(readFileSync(opts.serverCert)).raw;
  await certificateManager.trustCertificate(serverDer);

  // Anonymous on a secure channel. node-opcua itself refuses to try when the endpoint offers no
  // anonymous token policy, so the script adds one to its copy of the server's endpoints (the
  // client's private _serverEndpoints, from GetEndpoints at connect): the server, not the
  // client, must say no.
  {
    const client = await makeClient(certificateManager);
    const endpoints = client._serverEndpoints;
    const advertised = endpoints.some((e) =>
      (e.userIdentityTokens || []).some((p) => p.tokenType === UserTokenType.Anonymous),
    );
    for (const e of endpoints) {
      e.userIdentityTokens = [
        ...(e.userIdentityTokens || []),
        new UserTokenPolicy({ policyId: "anonymous", tokenType: UserTokenType.Anonymous }),
      ];
    }
    try {
      const session = await client.createSession({ type: UserTokenType.Anonymous });
      await session.close();
      emit({ step: "anonymous", advertised, refused: false });
    } catch (err) {
      emit({ step: "anonymous", advertised, refused: true, error: String(err.message).split("\n")[0] });
    } finally {
      await client.disconnect();
    }
  }

  const client = await makeClient(certificateManager);
  const session = await client.createSession({
    type: UserTokenType.UserName,
    userName: opts.user,
    password: opts.password,
  });
  try {
    emit({
      step: "session",
      securityMode: MessageSecurityMode[client.securityMode],
      securityPolicy: client.securityPolicy,
      user: opts.user,
    });

    const device = await childByName(session, resolveNodeId("ObjectsFolder"), opts.device);
    const equipment = await childByName(session, device.nodeId, opts.equipment);
    const variables = await session.browse(equipment.nodeId);
    emit({
      step: "browse",
      objects: device.names,
      device: equipment.names,
      equipment: variables.references.map((r) => r.browseName.name),
      equipmentNodeId: equipment.nodeId.toString(),
    });

    const ns = equipment.nodeId.namespace;
    const readId = `ns=${ns};s=${opts.readTag}`;
    const dv = await session.read(
      { nodeId: readId, attributeId: AttributeIds.Value },
      0,
    );
    const eu = await property(session, readId, "EngineeringUnits");
    const range = await property(session, readId, "EURange");
    emit({
      step: "read",
      nodeId: readId,
      value: dv.value.value,
      dataType: DataType[dv.value.dataType],
      status: dv.statusCode.name,
      sourceTimestamp: dv.sourceTimestamp ? dv.sourceTimestamp.toISOString() : null,
      unit: eu.displayName.text,
      unitId: eu.unitId,
      range: [range.low, range.high],
    });

    const subscription = await session.createSubscription2({
      requestedPublishingInterval: 20,
      requestedLifetimeCount: 600,
      requestedMaxKeepAliveCount: 20,
      maxNotificationsPerPublish: 100,
      publishingEnabled: true,
      priority: 1,
    });
    const subId = `ns=${ns};s=${opts.subscribeTag}`;
    const item = await subscription.monitor(
      { nodeId: subId, attributeId: AttributeIds.Value },
      { samplingInterval: 0, discardOldest: true, queueSize: 10 },
      TimestampsToReturn.Both,
    );
    const changes = [];
    let wake = () => {};
    item.on("changed", (value) => {
      changes.push(value);
      wake();
    });
    const next = (what) =>
      withTimeout(
        new Promise((resolve) => {
          const check = () => (changes.length ? resolve(changes.shift()) : (wake = check));
          check();
        }),
        opts.timeoutMs,
        what,
      );
    const first = await next("the first value of the subscription");
    emit({ step: "subscribed", nodeId: subId, value: first.value.value, status: first.statusCode.name });
    const changed = await next("a data change after the twin changed");
    emit({
      step: "datachange",
      value: changed.value.value,
      status: changed.statusCode.name,
      sourceTimestamp: changed.sourceTimestamp ? changed.sourceTimestamp.toISOString() : null,
    });
    await subscription.terminate();

    const writeId = `ns=${ns};s=${opts.writeTag}`;
    const ok = await writeValue(session, writeId, opts.writeOk);
    emit({ step: "write_ok", nodeId: writeId, value: opts.writeOk, status: ok.name });
    await waitFor("continue");

    const bad = await writeValue(session, writeId, opts.writeOutOfRange);
    const after = await session.read({ nodeId: writeId, attributeId: AttributeIds.Value });
    const outcome = await property(session, writeId, `${ns}:LastWriteOutcome`);
    emit({
      step: "write_out_of_range",
      value: opts.writeOutOfRange,
      status: bad.name,
      valueAfter: after.value.value,
      lastWriteOutcome: outcome,
    });
  } finally {
    await session.close();
    await client.disconnect();
  }
  emit({ step: "done" });
}

main().then(
  () => process.exit(0),
  (err) => {
    emit({ step: "error", error: String(err && err.stack ? err.stack : err) });
    process.exit(1);
  },
);
