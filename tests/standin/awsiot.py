#!/usr/bin/python3
"""The local AWS IoT stand-in: Jobs, MQTT file streams and presigned HTTPS.

Owns: one MQTT connection to the broker as the `service` client (the AWS
side), the Jobs state (jobs.py), the streams (streams.py), the HTTPS file
server (httpsd.py), per-thing outboxes that apply delays, faults and the AWS
caps, and the record tests assert on. Usable in-process (threads) by tests,
or as a program for demos (--help).

Differences from AWS IoT are listed in README.md; the main ones: replies to
Jobs requests reach the device only if it subscribed to them, and the broker
drops ACL-forbidden traffic silently instead of disconnecting.
"""

import json
import os
import queue
import threading
import time
import uuid

import paho.mqtt.client as mqtt

import jobs as jobs_mod
import ota_request
import streams as streams_mod
from faults import Faults, Pacer
from httpsd import PresignedServer
from pki import SERVICE, sign_bytes
from record import Record

MAX_JOB_DOCUMENT = 32768          # §1.2
DEFAULT_URL_LIFETIME = 1800       # OTA default expiresInSec (§4)


class Outbox:
    """Messages to one thing, sent in order by one thread: this is where the
    per-response delay and the AWS per-connection caps are applied."""

    def __init__(self, service, thing):
        self.service = service
        self.thing = thing
        self.pacer = None
        self._stopping = False
        self._q = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="standin-outbox-" + thing)
        self._thread.start()

    def account_incoming(self, nbytes):
        # AWS counts publishes in both directions against one connection.
        pacer = self.pacer
        if pacer:
            pacer.reserve(nbytes)

    def put(self, topic, payload, delay=0.0, block_bytes=0):
        self._q.put((time.monotonic() + delay, topic, payload, block_bytes))

    def stop(self):
        # Whatever is still queued (a paced backlog) is discarded.
        self._stopping = True
        self._q.put(None)
        self._thread.join(10)

    def _run(self):
        while True:
            item = self._q.get()
            if item is None or self._stopping:
                return
            not_before, topic, payload, block_bytes = item
            pacer = self.pacer
            if pacer:
                not_before = max(not_before, pacer.reserve(len(topic) + len(payload)))
            while not self._stopping and time.monotonic() < not_before:
                time.sleep(max(0.0, min(0.1, not_before - time.monotonic())))
            if self._stopping:
                return
            self.service.deliver(self.thing, topic, payload, block_bytes)


class AwsIot:
    def __init__(self, pki, broker, record=None, url_lifetime=DEFAULT_URL_LIFETIME):
        """broker: a broker.Broker (used for its port and restart_broker())."""
        self.pki = pki
        self.broker = broker
        self.record = record or Record()
        self.url_lifetime = url_lifetime
        self.jobs = jobs_mod.Jobs()
        self.streams = streams_mod.StreamStore()
        self.https = PresignedServer(pki.server_cert, pki.server_key,
                                     self.record, on_bytes=self._bytes_served)
        self._lock = threading.Lock()
        self._outboxes = {}
        self._faults = {}             # (thing, stream id or None) -> Faults
        self._byte_hooks = []         # [thing, remaining, callback]
        self._connected = threading.Event()
        self.client = mqtt.Client(client_id="standin-" + uuid.uuid4().hex[:12],
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.tls_set(ca_certs=pki.ca_cert, certfile=pki.client_cert(SERVICE),
                            keyfile=pki.client_key(SERVICE))
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.message_callback_add("$aws/things/+/jobs/#", self._on_jobs)
        self.client.message_callback_add("$aws/things/+/streams/#", self._on_streams)

    # ---- lifecycle ---------------------------------------------------------

    def start(self, timeout=10):
        self.https.start()
        self.client.connect("localhost", self.broker.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise RuntimeError("stand-in could not connect to the broker")
        return self

    def stop(self):
        with self._lock:
            boxes, self._outboxes = list(self._outboxes.values()), {}
        for box in boxes:
            box.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.https.stop()

    def restart_broker(self, down_seconds=0.0, timeout=10):
        """Restarts mosquitto on the same port; returns once the stand-in is
        connected again. Devices must reconnect and resubscribe."""
        self._connected.clear()
        self.broker.restart(down_seconds)
        if self._connected.wait(timeout):
            return
        # paho's network thread can die with ssl.SSLEOFError when it
        # reconnects into a broker that is still starting, and then never
        # tries again: reconnect the client by hand.
        self.client.loop_stop()
        for _ in range(5):
            try:
                self.client.reconnect()
                break
            except OSError:
                time.sleep(0.5)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise RuntimeError("stand-in did not reconnect after broker restart")

    def _on_connect(self, client, userdata, flags, rc):
        if rc != 0:
            return
        # Only request topics: the service must not see its own replies.
        client.subscribe([("$aws/things/+/jobs/get", 1),
                          ("$aws/things/+/jobs/start-next", 1),
                          ("$aws/things/+/jobs/+/get", 1),
                          ("$aws/things/+/jobs/+/update", 1),
                          ("$aws/things/+/streams/+/get/+", 1),
                          ("$aws/things/+/streams/+/describe/+", 1)])
        self._connected.set()

    # ---- outgoing ----------------------------------------------------------

    def _outbox(self, thing):
        with self._lock:
            box = self._outboxes.get(thing)
            if box is None:
                box = self._outboxes[thing] = Outbox(self, thing)
            return box

    def _send(self, thing, topic, payload, delay=0.0, block_bytes=0):
        if isinstance(payload, dict):
            payload = json.dumps(payload, separators=(",", ":")).encode()
        self._outbox(thing).put(topic, payload, delay, block_bytes)

    def deliver(self, thing, topic, payload, block_bytes):
        """Publishes now (called by the outbox once delays and caps allow)."""
        # QoS 1: the device's subscription QoS decides the delivered QoS.
        self.client.publish(topic, payload, qos=1)
        self.record.add_sent(thing, topic, payload)
        if block_bytes:
            self.record.add_bytes(thing, "mqtt", block_bytes)
            self._bytes_served(thing, block_bytes)

    def _bytes_served(self, thing, n):
        with self._lock:
            fired = []
            for hook in self._byte_hooks:
                if hook[0] == thing:
                    hook[1] -= n
                    if hook[1] <= 0:
                        fired.append(hook)
            for hook in fired:
                self._byte_hooks.remove(hook)
        for hook in fired:
            hook[2]()

    # ---- Jobs --------------------------------------------------------------

    def _on_jobs(self, client, userdata, msg):
        parts = msg.topic.split("/")
        thing, rest = parts[2], parts[4:]
        if rest == ["get"]:
            api, job_id = "get", None
        elif rest == ["start-next"]:
            api, job_id = "start-next", None
        elif len(rest) == 2 and rest[1] in ("get", "update"):
            api, job_id = {"get": "describe", "update": "update"}[rest[1]], rest[0]
        else:
            return
        self._outbox(thing).account_incoming(len(msg.topic) + len(msg.payload))
        try:
            request = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            request = None
        outcome, replies = self.jobs.handle(thing, api, job_id, request)
        # Recorded before the answer goes out (see _on_streams).
        self.record.add_request(thing, "jobs/" + api, msg.topic, request)
        if api == "update":
            code = replies[0][1].get("code") if outcome == "rejected" else None
            self.record.add_status_update(thing, job_id, request, outcome, code)
        self._send_all(thing, replies)

    def _send_all(self, thing, messages):
        delay = self.faults(thing).delay
        for topic, body in messages:
            self._send(thing, topic, body, delay)

    def queue_job(self, thing, job_id, document):
        """document: a dict (the job document), or a callable returning one
        each time it is delivered."""
        self._check_document_size(document)
        self._send_all(thing, self.jobs.queue(thing, job_id, document))

    def cancel_job(self, thing, job_id):
        self._send_all(thing, self.jobs.cancel(thing, job_id))

    def job_status(self, thing, job_id):
        return self.jobs.status(thing, job_id)

    def job_execution(self, thing, job_id):
        return self.jobs.execution(thing, job_id)

    def job_document(self, thing, job_id):
        """The document as delivered now (OTA jobs: with a fresh URL)."""
        return self.jobs.document(thing, job_id)

    def wait_for_status(self, thing, job_id, statuses, timeout=30):
        if isinstance(statuses, str):
            statuses = {statuses}
        return self.jobs.wait_for_status(thing, job_id, set(statuses), timeout)

    def wait_terminal(self, thing, job_id, timeout=60):
        return self.wait_for_status(thing, job_id, jobs_mod.TERMINAL, timeout)

    @staticmethod
    def _check_document_size(document):
        doc = document() if callable(document) else document
        size = len(json.dumps(doc, separators=(",", ":")))
        if size > MAX_JOB_DOCUMENT:
            raise ValueError("job document is %d bytes, AWS allows %d"
                             % (size, MAX_JOB_DOCUMENT))

    # ---- OTA jobs (afr_ota, §2) --------------------------------------------

    def queue_ota_job(self, thing, job_id, image=None, files=None,
                      protocols=("MQTT",), stream_id=None, signing_key=None,
                      signature=None, certfile="ota-signer.crt", file_type=0,
                      filepath="firmware.bin", split_bytes=None, part_fields=None,
                      url_lifetime=None, reuse_stream=False):
        """Queues an `afr_ota` job and makes its data available.

        image: bytes or a path, for a one-file job. files: instead, a list of
        dicts with "data" (bytes) or "path", and optional "filepath",
        "fileid", "fileType", "certfile", "signature" (raw base64 put in
        sig-sha256-ecdsa as is), "signing_key" (path); other keys are copied
        into the files[] entry verbatim.
        signing_key / signature: defaults for every file (default key: the
        PKI's trusted code-signing key).
        split_bytes=N: each file is cut into N-byte parts, each part its own
        files[] entry (fileid 0..k-1, own filesize and signature);
        part_fields(index, offset, part) -> dict adds/overrides entry fields.
        reuse_stream: stream_id names a stream created before (CreateStream)
        whose file ids the entries already use; it is left as it is.
        Returns {"stream_id", "entries" (files[] without URLs), "document"
        (the callable that renders the job document)}.
        """
        protocols = list(protocols)
        if files is None:
            files = [{"data": image} if isinstance(image, bytes) else {"path": image}]
        specs = []
        for n, spec in enumerate(files):
            spec = dict(spec)
            if "path" in spec:
                with open(spec.pop("path"), "rb") as f:
                    spec["data"] = f.read()
            spec.setdefault("filepath", filepath)
            spec.setdefault("fileType", file_type)
            spec.setdefault("certfile", certfile)
            spec.setdefault("fileid", n)
            specs.append(spec)
        if split_bytes:
            specs = self._split(specs, split_bytes, part_fields)

        stream_id = stream_id or "AFR_OTA-" + str(uuid.uuid4())
        entries, http_keys = [], []
        for spec in specs:
            data = spec.pop("data")
            sig = spec.pop("signature", signature)
            key_file = spec.pop("signing_key", signing_key) or self.pki.signer_key
            sig_key = spec.pop("sig_key", "sig-sha256-ecdsa")
            entry = {"filepath": spec.pop("filepath"), "filesize": len(data),
                     "fileid": spec.pop("fileid"), "certfile": spec.pop("certfile"),
                     "fileType": spec.pop("fileType"),
                     sig_key: sig if sig is not None else sign_bytes(data, key_file)}
            entry.update(spec)
            entries.append((entry, data))
        if "MQTT" in protocols and not reuse_stream:
            self.streams.create(stream_id, {e["fileid"]: d for e, d in entries},
                                "OTA job %s" % job_id)
        if "HTTP" in protocols:
            for e, d in entries:
                key = "ota/%s/%s/%d-%s" % (thing, job_id, e["fileid"],
                                           os.path.basename(e["filepath"]) or "file")
                self.https.add_file(key, d, thing)
                http_keys.append(key)
        lifetime = url_lifetime or self.url_lifetime

        def document():
            # A fresh presigned URL on every delivery, like the Jobs service
            # substituting ${aws:iot:s3-presigned-url:…} (§4).
            out = []
            for n, (e, _) in enumerate(entries):
                e = dict(e)
                if "HTTP" in protocols:
                    e["update_data_url"] = self.https.presign(http_keys[n], lifetime)
                    e["auth_scheme"] = "aws.s3.presigned"
                out.append(e)
            ota = {"protocols": protocols, "files": out}
            if "MQTT" in protocols:
                ota["streamname"] = stream_id
            return {"afr_ota": ota}

        self.queue_job(thing, job_id, document)
        return {"stream_id": stream_id if "MQTT" in protocols else None,
                "entries": [dict(e) for e, _ in entries], "document": document}

    @staticmethod
    def _split(specs, size, part_fields):
        parts = []
        for spec in specs:
            data = spec["data"]
            for offset in range(0, len(data), size):
                part = dict(spec, data=data[offset:offset + size], fileid=len(parts))
                if part_fields:
                    part.update(part_fields(len(parts), offset, part["data"]))
                parts.append(part)
        return parts

    # ---- CreateOTAUpdate / CreateStream from their request JSON -----------

    def create_stream_request(self, request, files_dir):
        """CreateStream as `aws iot create-stream --cli-input-json
        file://create-stream.json` sends it: each files[] entry's S3 object
        is read from files_dir/<key> (the directory stands in for every
        bucket). Returns the stream id."""
        ota_request.validate("CreateStream", request)
        files = {}
        for f in request["files"]:
            files[f["fileId"]] = ota_request.read_object(files_dir, f["s3Location"])
        self.streams.create(request["streamId"], files, request.get("description", ""))
        return request["streamId"]

    def create_ota_update(self, request, files_dir, things=None):
        """CreateOTAUpdate as `aws iot create-ota-update --cli-input-json
        file://ota-update.json` sends it, mapped to an afr_ota job the way
        the OTA Update Manager does (ota_request.py says how): S3 files are
        read from files_dir/<key>; MQTT gets a stream AFR_OTA-<uuid> unless
        the files name an existing one; the job is AFR_OTA-<otaUpdateId>
        for every thing of `targets` (thing ARNs; `things` overrides them).
        Returns queue_ota_job()'s answer for the first thing, plus "job_id"
        and "things"."""
        plan = ota_request.plan(request, files_dir, self.streams)
        things = list(things) if things else plan["things"]
        out = None
        for thing in things:
            info = self.queue_ota_job(thing, plan["job_id"], files=plan["files"],
                                      protocols=plan["protocols"],
                                      stream_id=plan["stream_id"],
                                      url_lifetime=plan["url_lifetime"],
                                      reuse_stream=plan["stream_exists"])
            out = out or dict(info, job_id=plan["job_id"], things=things)
        return out

    # ---- Streams (§3) ------------------------------------------------------

    def create_stream(self, stream_id, files, description=""):
        self.streams.create(stream_id, files, description)

    def _on_streams(self, client, userdata, msg):
        parts = msg.topic.split("/")
        if len(parts) != 7 or parts[6] not in ("cbor", "json"):
            return
        thing, stream_id, op, fmt = parts[2], parts[4], parts[5], parts[6]
        self._outbox(thing).account_incoming(len(msg.topic) + len(msg.payload))
        base = "$aws/things/%s/streams/%s/" % (thing, stream_id)
        faults = self.faults(thing, stream_id)
        stream = self.streams.get(stream_id)
        req, replies = {}, []        # replies: (topic, payload, block bytes)
        try:
            req = streams_mod.decode_request(fmt, msg.payload)
            if op == "describe":
                if stream is None:
                    raise streams_mod.StreamError("ResourceNotFound",
                                                  "Stream not found", req.get("c"))
                replies.append((base + "description/" + fmt,
                                streams_mod.encode_description(fmt, req.get("c"), stream), 0))
            else:
                blocks = streams_mod.select_blocks(stream, req)
                size = req["l"]
                nblocks = (len(stream.files[req["f"]]) + size - 1) // size
                for b in faults.apply(blocks, nblocks):
                    replies.append((base + "data/" + fmt,
                                    streams_mod.encode_block(fmt, req.get("c"), b), len(b.p)))
            fields = dict(req)
        except streams_mod.StreamError as err:
            replies.append((base + "rejected/" + fmt,
                            streams_mod.encode_rejected(fmt, err), 0))
            fields = dict(req, rejected=err.code)
        if isinstance(fields.get("b"), bytes):
            fields["b"] = fields["b"].hex()
        # Recorded before anything is sent, so a test that saw the answer
        # also finds the request in the record.
        self.record.add_request(thing, "streams/" + op, msg.topic, fields)
        for topic, payload, block_bytes in replies:
            self._send(thing, topic, payload, faults.delay, block_bytes)

    # ---- knobs -------------------------------------------------------------

    def set_faults(self, thing, stream_id=None, **knobs):
        """Sets the fault knobs (faults.Faults) for one thing's stream, or for
        all its streams and Jobs replies when stream_id is None. Replaces the
        previous knobs of that scope; no knobs = no faults."""
        with self._lock:
            self._faults[(thing, stream_id)] = Faults(**knobs)

    def faults(self, thing, stream_id=None):
        with self._lock:
            return (self._faults.get((thing, stream_id))
                    or self._faults.get((thing, None)) or Faults())

    def set_aws_caps(self, thing, enabled=True, bytes_per_s=None, publishes_per_s=None):
        """AWS per-connection caps for one thing: ≤512 KiB/s and ≤100
        publishes/s counting both directions; excess is delayed."""
        pacer = None
        if enabled:
            pacer = Pacer()
            if bytes_per_s:
                pacer.bytes_per_s = bytes_per_s
            if publishes_per_s:
                pacer.publishes_per_s = publishes_per_s
        self._outbox(thing).pacer = pacer

    def when_bytes_served(self, thing, nbytes, callback):
        """Calls callback() once `nbytes` more block bytes (MQTT or HTTPS)
        have been served to thing."""
        with self._lock:
            self._byte_hooks.append([thing, nbytes, callback])

    def cancel_job_after(self, thing, job_id, nbytes):
        """Cancels the job mid-transfer once nbytes more have been served."""
        self.when_bytes_served(thing, nbytes, lambda: self.cancel_job(thing, job_id))

    def expire_urls(self):
        """Every presigned URL handed out so far now gets 403 (expired)."""
        self.https.expire_all_now()


def main():
    import argparse
    from harness import Stack

    ap = argparse.ArgumentParser(
        description="Run a local AWS IoT stand-in (TLS mosquitto + Jobs + "
                    "streams + presigned HTTPS) for otad demos.")
    ap.add_argument("--thing", action="append", default=[],
                    help="thing name (repeatable; default thing-A)")
    ap.add_argument("--workdir", help="keep PKI, configs and logs here "
                    "instead of a temporary directory")
    ap.add_argument("--ota-file", help="queue an afr_ota job for this file "
                    "to the first thing")
    ap.add_argument("--protocol", choices=("MQTT", "HTTP"), action="append",
                    help="data protocol(s) of the OTA job (default MQTT)")
    ap.add_argument("--job-id", default="AFR_OTA-demo-1")
    ap.add_argument("--ota-update", metavar="JSON",
                    help="queue the OTA update of this CreateOTAUpdate request "
                    "(`otad bundle create`'s ota-update.json); its S3 keys are "
                    "files beside it, its targets the things (else the first)")
    ap.add_argument("--create-stream", metavar="JSON",
                    help="first create the stream of this CreateStream request "
                    "(create-stream.json)")
    ap.add_argument("--aws-caps", action="store_true",
                    help="apply AWS's 512 KiB/s and 100 publishes/s per thing")
    args = ap.parse_args()
    things = args.thing or ["thing-A"]

    with Stack(things=things, workdir=args.workdir) as stack:
        for thing in things:
            path = stack.write_otad_config(thing)
            print("otad config for %s: %s" % (thing, path))
            if args.aws_caps:
                stack.service.set_aws_caps(thing)
        print("broker: mqtts://localhost:%d  https: 127.0.0.1:%d  work dir: %s"
              % (stack.broker.port, stack.service.https.port, stack.workdir))
        if args.create_stream:
            with open(args.create_stream) as f:
                sid = stack.service.create_stream_request(
                    json.load(f), os.path.dirname(os.path.abspath(args.create_stream)))
            print("created stream %s" % sid)
        if args.ota_update:
            with open(args.ota_update) as f:
                request = json.load(f)
            info = stack.service.create_ota_update(
                request, os.path.dirname(os.path.abspath(args.ota_update)),
                things=None if all(ota_request.THING_ARN_RE.match(t) and
                                   ota_request.THING_ARN_RE.match(t).group(1) in things
                                   for t in request["targets"]) else things[:1])
            print("queued %s for %s" % (info["job_id"], ", ".join(info["things"])))
        if args.ota_file:
            stack.service.queue_ota_job(things[0], args.job_id, args.ota_file,
                                        protocols=args.protocol or ["MQTT"])
            print("queued %s for %s" % (args.job_id, things[0]))
        print("Ctrl-C to stop.", flush=True)
        seen = 0
        try:
            while True:
                time.sleep(0.5)
                updates = stack.service.record.status_updates()
                for u in updates[seen:]:
                    print("%s %s %s %s %s" % (u["thing"], u["job_id"], u["status"],
                                              json.dumps(u["statusDetails"]), u["outcome"]),
                          flush=True)
                seen = len(updates)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
