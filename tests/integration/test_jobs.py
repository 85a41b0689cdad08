#!/usr/bin/python3
"""otad's MQTT session and Jobs client against the local AWS IoT stand-in
(TLS mosquitto + the Jobs state machine, tests/standin): what an operator
would check in the console and the journal.

Run: /usr/bin/python3 tests/standin/tap.py tests/integration/test_jobs.py
(OTAD_BIN picks the daemon, default build/src/otad).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))

import harness  # noqa: E402

# Every wait is bounded; these are generous for a loaded CI machine.
CONNECT_TIMEOUT = 15
JOB_TIMEOUT = 30

FAST_RECONNECT = {"reconnect_min": 1, "reconnect_max": 2}


def write_handler(directory, name, body, mode=0o755):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, mode)
    return path


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every practical purpose but still answers kill 0.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.1)


class JobsTestCase(unittest.TestCase):
    """One stack (PKI, broker, stand-in) for the class; every test uses its
    own thing, so that jobs and logs never mix."""

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(things=["thing-setup"]).__enter__()
        # A handler dir as the brief for users says: owned by root, 0755.
        cls.handlers = tempfile.mkdtemp(prefix="handlers-", dir=cls.stack.workdir)
        os.chmod(cls.handlers, 0o755)
        write_handler(cls.handlers, "hello",
                      'echo "hello from $OTAD_THING_NAME job $OTAD_JOB_ID"\n'
                      'read -r doc\necho "stdin: $doc"\necho "a warning" >&2\n')
        write_handler(cls.handlers, "fail3", 'echo "disk full"\nexit 3\n')
        write_handler(cls.handlers, "slow",
                      'echo $$ > "$(dirname "$0")/../slow-$OTAD_JOB_ID.pid"\n'
                      'sleep 300\n')
        write_handler(cls.handlers, "order",
                      'sleep 1\necho "$OTAD_JOB_ID" >> "$(dirname "$0")/../order-$OTAD_THING_NAME"\n')
        write_handler(cls.handlers, "nap3", 'sleep 3\necho "rested"\n')
        write_handler(cls.handlers, "writable", 'echo never\n', mode=0o777)
        # Sockets of otad, of the MQTT session above all, stay with otad.
        write_handler(cls.handlers, "sockets", 'ls -l /proc/$$/fd | grep -c "socket:" || true\n')

    @classmethod
    def tearDownClass(cls):
        cls.stack.close()

    def setUp(self):
        self.thing = "thing-" + self.id().rsplit(".", 1)[-1].replace("test_", "").replace("_", "-")
        self.stack.add_thing(self.thing)
        self.service = self.stack.service
        self.record = self.service.record

    def start_otad(self, mqtt=None, jobs=None):
        sections = {"mqtt": dict(FAST_RECONNECT, **(mqtt or {})),
                    "jobs": dict({"handler_dir": self.handlers}, **(jobs or {}))}
        otad = self.stack.start_otad(self.thing, sections)
        self.addCleanup(otad.stop)
        return otad

    def start_connected(self, **kw):
        otad = self.start_otad(**kw)
        otad.wait_for_log(r"Connected to localhost", CONNECT_TIMEOUT)
        # Subscribed and asked for the next job: ready for notify-next.
        wait_until(lambda: self.next_get_count() >= 1, CONNECT_TIMEOUT, "$next/get")
        return otad

    def next_get_count(self):
        return len([r for r in self.record.requests(thing=self.thing, api="jobs/describe")
                    if r.get("topic", "").endswith("/jobs/$next/get")])

    def updates(self, job_id):
        return [u for u in self.record.status_updates(thing=self.thing, job_id=job_id)]

    def final(self, job_id, timeout=JOB_TIMEOUT):
        status = self.service.wait_terminal(self.thing, job_id, timeout)
        return status, self.service.job_execution(self.thing, job_id)

    def assert_running(self, otad):
        self.assertTrue(otad.running(), "otad exited:\n" + otad.log()[-2000:])

    def queue_oversize(self, job_id, document):
        # The stand-in refuses > 32 KiB like AWS would at CreateJob; go
        # around that check to see what otad does if one arrives anyway.
        self.service._send_all(self.thing, self.service.jobs.queue(self.thing, job_id, document))

    def notify_next_raw(self, payload):
        topic = "$aws/things/%s/jobs/notify-next" % self.thing
        info = self.service.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)


# "Connection to localhost:1234 (address 127.0.0.1) failed: ..."
FAILED = r"Connection to localhost:\d+ \(address [^)]+\) failed: "


class TestSession(JobsTestCase):
    def failures(self, otad):
        return [line.split(" failed: ", 1)[1] for line in otad.grep(FAILED)]

    def assert_every_failure(self, otad, pattern, at_least=2, since=0):
        """At least at_least attempts failed (after the first since ones),
        each for the same stated reason: the cause must not depend on how
        the race of one attempt went."""
        wait_until(lambda: len(self.failures(otad)) >= since + at_least, CONNECT_TIMEOUT,
                   "%d failed attempts" % at_least)
        for reason in self.failures(otad)[since:]:
            self.assertRegex(reason, pattern)
        self.assertFalse(otad.grep(r"Connected to"))
        self.assertEqual(self.next_get_count(), 0)
        self.assert_running(otad)

    def test_connects_with_thing_certificate(self):
        otad = self.start_connected()
        # The broker's ACL lets a client publish only under the thing of its
        # certificate's CN, so a recorded $next/get proves who connected.
        self.assertGreaterEqual(self.next_get_count(), 1)
        self.assertTrue(otad.grep(r"Connected to localhost:\d+ \(address 127\.0\.0\.1\) as %s" % self.thing))
        self.assert_running(otad)

    def test_wrong_ca_is_refused_clearly_and_retried(self):
        otad = self.start_otad(mqtt={"ca_file": self.stack.pki.rogue_cert})
        # Still trying, with backoff, and never connected insecurely; every
        # attempt names the CA file, none blames our certificate.
        self.assert_every_failure(
            otad, r"^the broker's certificate is not trusted by ca_file .*rogue\.crt: .*\(its chain ends at "
                  r"CN=otad-standin-CA, which ca_file does not hold; wrong ca_file\?\)$", at_least=3)

    def test_wrong_host_name_is_refused_clearly(self):
        # "vm" resolves to 127.0.0.1, which the broker's certificate names
        # too: only a check against the endpoint's name refuses it.
        otad = self.start_otad(mqtt={"endpoint": "vm"})
        otad.wait_for_log(r"Connection to vm:\d+ \(address 127\.0\.0\.1\) failed: the broker's certificate does "
                          r"not match the host name vm: it is for DNS:localhost, IP:127\.0\.0\.1, IP:10\.0\.2\.2 \(wrong endpoint\?\)",
                          CONNECT_TIMEOUT)
        self.assertFalse(otad.grep(r"Connected to"))
        self.assert_running(otad)

    def test_nothing_listening_is_retried_with_backoff(self):
        import broker
        otad = self.start_otad(mqtt={"port": broker.free_port()})
        self.assert_every_failure(otad, r"^Connection refused$", at_least=3)
        delays = [float(x) for line in otad.grep(r"Reconnecting to localhost:\d+ in ")
                  for x in [line.rsplit(" in ", 1)[1].split()[0]]]
        # Full jitter between reconnect_min=1 and reconnect_max=2 seconds.
        self.assertTrue(all(1.0 <= d <= 2.0 for d in delays), delays)

    def test_connack_refusals_are_explained(self):
        # AWS says 7 where MQTT 3.1.1 says 5 for "not authorized".
        for rc, text in ((5, r"CONNACK 5, not authorized"), (7, r"CONNACK 7, not authorized by AWS IoT")):
            with MinimalBroker(self.stack.pki, connack=rc) as broker:
                # Both runs log to the same file.
                since = len(self.failures(self.stack.children[-1])) if rc == 7 else 0
                otad = self.start_otad(mqtt={"port": broker.port})
                self.assert_every_failure(otad, r"^broker refused the connection: %s" % text, since=since)
                otad.stop()

    def test_port_443_offers_aws_alpn(self):
        # AWS IoT takes MQTT with client certificates on 443 only with the
        # ALPN protocol x-amzn-mqtt-ca. A bare TLS server records the offer.
        import socket
        import ssl
        import threading
        pki = self.stack.pki
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        ctx.load_verify_locations(pki.ca_cert)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
        try:
            listener = socket.create_server(("127.0.0.1", 443))
        except OSError as e:
            self.skipTest("port 443 is not available: %s" % e)
        self.addCleanup(listener.close)
        listener.settimeout(CONNECT_TIMEOUT)
        seen = {}

        def serve():
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen["alpn"] = tls.selected_alpn_protocol()
                seen["client"] = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        self.start_otad(mqtt={"port": 443})
        server.join(CONNECT_TIMEOUT)
        self.assertEqual(seen.get("alpn"), "x-amzn-mqtt-ca")
        self.assertEqual(seen.get("client"), self.thing)

    def test_sni_names_the_endpoint_not_the_address(self):
        # otad connects to one resolved address at a time; SNI (which AWS
        # IoT requires) must still carry the endpoint's name.
        with MinimalBroker(self.stack.pki) as broker:
            otad = self.start_otad(mqtt={"port": broker.port})
            otad.wait_for_log(r"Connected to localhost:%d \(address 127\.0\.0\.1\)" % broker.port, CONNECT_TIMEOUT)
            self.assertEqual(set(broker.sni), {"localhost"})

    def test_refused_client_certificate_is_reported(self):
        pki = self.stack.pki
        otad = self.start_otad(mqtt={"cert_file": pki.rogue_cert, "key_file": pki.rogue_key})
        # Whether the alert arrives before or after our CONNECT went out
        # (TLS 1.3), the broker's words are what is reported.
        self.assert_every_failure(
            otad, r'^the broker refused our client certificate .*/rogue\.crt: TLS alert "unknown CA"$', at_least=4)

    def test_expired_client_certificate_is_reported(self):
        cert, key = self.stack.pki.add_expired_client(self.thing + "-expired")
        otad = self.start_otad(mqtt={"cert_file": cert, "key_file": key})
        # Said before connecting, from our own clock, and then as the broker
        # said it.
        otad.wait_for_log(r"The broker will refuse this certificate unless the clock is wrong: the client certificate "
                          r".*-expired\.crt expired on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(this system's clock says ",
                          CONNECT_TIMEOUT)
        self.assert_every_failure(
            otad, r'^the broker refused our client certificate .*-expired\.crt: TLS alert "certificate expired" '
                  r'\(it expired on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)$', at_least=3)
        # The warning once, not once per attempt.
        self.assertEqual(len(otad.grep(r"The broker will refuse this certificate")), 1)

    def test_key_of_another_certificate_is_named(self):
        pki = self.stack.pki
        otad = self.start_otad(mqtt={"key_file": pki.client_key("thing-setup")})
        # Found before any connection is tried, and retried: the files may
        # be fixed while otad runs.
        wait_until(lambda: len(otad.grep(r"Connection to localhost:\d+ failed: ")) >= 2, CONNECT_TIMEOUT,
                   "two failed cycles")
        for line in otad.grep(r"Connection to localhost:\d+ failed: "):
            self.assertRegex(line, r"failed: the private key in key_file .*/thing-setup\.key does not belong to the "
                                   r"certificate in cert_file .*/%s\.crt$" % self.thing)
        self.assertFalse(otad.grep(r"Connecting to"))
        self.assert_running(otad)

    def test_missing_ca_file_is_named(self):
        otad = self.start_otad(mqtt={"ca_file": os.path.join(self.stack.workdir, "no-such-ca.pem")})
        otad.wait_for_log(r"Connection to localhost:\d+ failed: cannot open ca_file .*/no-such-ca\.pem: "
                          r"No such file or directory", CONNECT_TIMEOUT)
        self.assert_running(otad)

    def test_unknown_host_is_named(self):
        # Refused by the resolver's own syntax check: no DNS server is asked.
        otad = self.start_otad(mqtt={"endpoint": "no..such..host"})
        wait_until(lambda: len(otad.grep(r"Connection to no\.\.such\.\.host:\d+ failed: cannot look up "
                                         r"no\.\.such\.\.host: Name or service not known$")) >= 2,
                   CONNECT_TIMEOUT, "two failed lookups")
        self.assertFalse(otad.grep(r"Connecting to"))
        self.assert_running(otad)

    def test_no_tcp_answer_times_out(self):
        # A listener whose accept queue is full drops every further SYN, as
        # a broken path does: the connect gets no answer at all.
        import socket
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        self.addCleanup(listener.close)
        fillers = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(listener.getsockname())
            fillers.append(c)
        for c in fillers:
            self.addCleanup(c.close)
        otad = self.start_otad(mqtt={"port": listener.getsockname()[1]})
        otad.wait_for_log(FAILED + r"TCP connect timed out after 10 s$", 10 + CONNECT_TIMEOUT)
        self.assert_running(otad)

    def test_silent_server_times_out_in_the_tls_handshake(self):
        import socket
        import threading
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        accepted = []

        def accept():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)   # never answers
            except OSError:
                pass

        threading.Thread(target=accept, daemon=True).start()
        self.addCleanup(lambda: [c.close() for c in accepted])
        otad = self.start_otad(mqtt={"port": listener.getsockname()[1]})
        otad.wait_for_log(FAILED + r"the TLS handshake did not finish within 20 s$", 20 + CONNECT_TIMEOUT)
        self.assert_running(otad)

    def server_that_answers(self, reply):
        """A port on 127.0.0.1 that reads what a client sends first, answers
        reply and hangs up, for as long as the test runs; returns it."""
        import threading
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def answer():
            try:
                while True:
                    conn, _ = listener.accept()
                    with conn:
                        conn.recv(1024)
                        conn.sendall(reply)
            except OSError:
                pass

        threading.Thread(target=answer, daemon=True).start()
        return listener.getsockname()[1]

    def test_server_that_is_not_tls_is_named(self):
        # A web server (or a proxy) on the port: its first bytes are no TLS
        # record.
        port = self.server_that_answers(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        otad = self.start_otad(mqtt={"port": port})
        self.assert_every_failure(otad, r"^the server does not answer in TLS \(OpenSSL: wrong version number\): is this "
                                        r"the broker's TLS port\?$")

    def test_plain_mqtt_listener_is_named(self):
        # A broker's plain MQTT port takes the ClientHello for a broken
        # packet and hangs up without a word.
        port = self.server_that_answers(b"")
        otad = self.start_otad(mqtt={"port": port})
        self.assert_every_failure(otad, r"^the broker closed the connection during the TLS handshake without a TLS alert "
                                        r"\(as a port that does not speak TLS would, e\.g\. a plain MQTT listener\)$")

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"),
                         "needs root, unshare and ip for a private network namespace")
    def test_unreachable_network_is_named(self):
        # A network namespace with only a loopback: no route to anywhere.
        config = self.stack.write_otad_config(self.thing, {"mqtt": dict(FAST_RECONNECT, endpoint="192.0.2.1")})
        otad = self.stack.start_process(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && exec %s -c %s" % (harness.otad_binary(), config)],
            "otad-" + self.thing)
        self.addCleanup(otad.stop)
        otad.wait_for_log(r"Connection to 192\.0\.2\.1:\d+ \(address 192\.0\.2\.1\) failed: Network is unreachable$",
                          CONNECT_TIMEOUT)
        self.assert_running(otad)


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("unshare"),
                     "needs root and unshare for a private mount namespace")
class TestAddresses(JobsTestCase):
    """localhost resolving to ::1 first (as Debian's /etc/hosts has it) and
    the broker on 127.0.0.1 only: the AWS case of an endpoint with several
    addresses and a broken IPv6 path. /etc/hosts is replaced only inside a
    private mount namespace of otad's."""

    def start_with_hosts(self, hosts, mqtt=None):
        path = os.path.join(self.stack.workdir, "hosts-" + self.thing)
        with open(path, "w") as f:
            f.write(hosts)
        config = self.stack.write_otad_config(self.thing, {"mqtt": dict(FAST_RECONNECT, **(mqtt or {})),
                                                           "jobs": {"handler_dir": self.handlers}})
        otad = self.stack.start_process(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount --bind %s /etc/hosts && exec %s -c %s" % (path, harness.otad_binary(), config)],
            "otad-" + self.thing)
        self.addCleanup(otad.stop)
        return otad

    def test_each_address_is_tried_in_turn(self):
        otad = self.start_with_hosts("::1 localhost\n127.0.0.1 localhost\n")
        port = self.stack.broker.port
        otad.wait_for_log(r"Connected to localhost:%d \(address 127\.0\.0\.1\) as %s" % (port, self.thing),
                          CONNECT_TIMEOUT)
        # ::1 first, refused, then the next address in the same cycle: no
        # backoff in between.
        self.assertTrue(otad.grep(r"Connecting to localhost:%d \(address ::1, 1 of 2\)" % port))
        self.assertTrue(otad.grep(r"Connection to localhost:%d \(address ::1\) failed: Connection refused; "
                                  r"trying 127\.0\.0\.1 next" % port))
        self.assertFalse(otad.grep(r"Reconnecting to"))
        # And it works: a job runs.
        wait_until(lambda: self.next_get_count() >= 1, CONNECT_TIMEOUT, "$next/get")
        self.service.queue_job(self.thing, "dual-1", {"operation": "hello"})
        self.assertEqual(self.final("dual-1")[0], "SUCCEEDED")

    def test_an_address_that_never_answers_is_left_after_10_s(self):
        # ::1 on the broker's port drops every SYN (a full accept queue):
        # the cellular IPv6 that routes nowhere.
        import socket
        port = self.stack.broker.port
        try:
            listener = socket.socket(socket.AF_INET6)
            listener.bind(("::1", port))
            listener.listen(0)
        except OSError as e:
            self.skipTest("cannot listen on [::1]:%d: %s" % (port, e))
        self.addCleanup(listener.close)
        for _ in range(3):
            c = socket.socket(socket.AF_INET6)
            c.setblocking(False)
            c.connect_ex(("::1", port))
            self.addCleanup(c.close)
        otad = self.start_with_hosts("::1 localhost\n127.0.0.1 localhost\n")
        otad.wait_for_log(r"Connected to localhost:%d \(address 127\.0\.0\.1\)" % port, 10 + CONNECT_TIMEOUT)
        self.assertTrue(otad.grep(r"Connection to localhost:%d \(address ::1\) failed: TCP connect timed out after 10 s; "
                                  r"trying 127\.0\.0\.1 next" % port))
        self.assertFalse(otad.grep(r"Reconnecting to"))

    def test_every_address_failing_ends_the_cycle(self):
        import broker
        # Nothing listens on this port at either address.
        otad = self.start_with_hosts("::1 localhost\n127.0.0.1 localhost\n", mqtt={"port": broker.free_port()})
        wait_until(lambda: len(otad.grep(r"Reconnecting to localhost")) >= 2, CONNECT_TIMEOUT, "two cycles")
        # Each cycle: ::1 (warning, moving on), then 127.0.0.1 (the error).
        self.assertGreaterEqual(len(otad.grep(r"warning: Connection to localhost:\d+ \(address ::1\) failed: "
                                              r"Connection refused; trying 127\.0\.0\.1 next")), 2)
        self.assertGreaterEqual(len(otad.grep(r"err: Connection to localhost:\d+ \(address 127\.0\.0\.1\) failed: "
                                              r"Connection refused$")), 2)


class MinimalBroker:
    """Just enough MQTT 3.1.1 over mutual TLS to answer what mosquitto
    never says: a CONNACK refusal (AWS's rc 7 among them) and SUBACK 0x80."""

    def __init__(self, pki, connack=0, refuse=None):
        import socket
        import ssl
        import threading
        self.connack = connack
        self.refuse = refuse
        self.connects = 0
        self.sni = []                       # server names the clients asked for
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        self.ctx.load_cert_chain(pki.server_cert, pki.server_key)
        self.ctx.load_verify_locations(pki.ca_cert)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join(5)
        self.listener.close()

    def _serve(self):
        import socket
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            try:
                conn.settimeout(5)
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self._session(tls)
            except OSError:
                pass

    @staticmethod
    def _read_packet(tls):
        def read(n):
            data = b""
            while len(data) < n:
                chunk = tls.recv(n - len(data))
                if not chunk:
                    raise OSError("closed")
                data += chunk
            return data
        kind = read(1)[0]
        length, shift = 0, 0
        while True:
            b = read(1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return kind, read(length)

    def _session(self, tls):
        while self.running:
            kind, body = self._read_packet(tls)
            if kind == 0x10:                              # CONNECT
                self.connects += 1
                tls.sendall(bytes([0x20, 2, 0, self.connack]))
                if self.connack:
                    return
            elif kind == 0x82:                            # SUBSCRIBE
                mid, pos, codes = body[:2], 2, []
                while pos < len(body):
                    n = int.from_bytes(body[pos:pos + 2], "big")
                    topic = body[pos + 2:pos + 2 + n].decode()
                    qos = body[pos + 2 + n]
                    pos += 3 + n
                    codes.append(0x80 if self.refuse and self.refuse in topic else qos)
                tls.sendall(bytes([0x90, 2 + len(codes)]) + mid + bytes(codes))
            elif kind == 0xC0:                            # PINGREQ
                tls.sendall(bytes([0xD0, 0]))
            elif kind & 0xF0 == 0x30 and kind & 0x06:     # PUBLISH QoS 1
                n = int.from_bytes(body[:2], "big")
                tls.sendall(bytes([0x40, 2]) + body[2 + n:4 + n])
            elif kind == 0xE0:                            # DISCONNECT
                return


def probe_binary():
    build = os.environ.get("OTAD_BUILD_ROOT") or os.path.dirname(os.path.dirname(harness.otad_binary()))
    return os.path.join(build, "tests", "integration", "mqtt-probe")


class TestSubscriptions(JobsTestCase):
    """mqtt.c alone through tests/integration/mqtt-probe: SUBACK codes and
    AWS's 8 filters per SUBSCRIBE."""

    def probe(self, filters, port=None):
        binary = probe_binary()
        if not os.path.exists(binary):
            self.skipTest("%s not built" % binary)
        mqtt = dict(FAST_RECONNECT, **({"port": port} if port else {}))
        config = self.stack.write_otad_config(self.thing, {"mqtt": mqtt})
        proc = subprocess.run([binary, config] + filters, capture_output=True, text=True, timeout=30)
        return proc.returncode, proc.stdout, proc.stderr

    def test_refused_filter_is_reported(self):
        # mosquitto 2.0 grants every SUBSCRIBE (its ACL file does not check
        # subscriptions); a minimal broker answers 0x80 like AWS does for a
        # filter its policy refuses.
        with MinimalBroker(self.stack.pki, refuse="shadow") as broker:
            code, out, err = self.probe(["jobs/notify-next", "shadow/update/accepted"], port=broker.port)
        self.assertEqual(code, 0, err)
        self.assertIn("suback jobs/notify-next granted", out)
        self.assertIn("suback shadow/update/accepted refused", out)
        self.assertRegex(err, r"refused the subscription to \$aws/things/%s/shadow/update/accepted \(SUBACK 0x80\)"
                         % self.thing)

    def test_at_most_8_filters_per_subscribe(self):
        filters = ["streams/s%d/data/cbor" % i for i in range(11)]
        code, out, err = self.probe(filters)
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(l for l in out.splitlines() if l.startswith("suback")),
                         sorted("suback %s granted" % f for f in filters))
        # libmosquitto logs every filter with the packet id of its SUBSCRIBE.
        mids = {}
        for m in re.finditer(r"sending SUBSCRIBE \(Mid: (\d+), Topic: ([^,]+),", err):
            mids.setdefault(m.group(1), []).append(m.group(2))
        self.assertEqual(sorted(len(v) for v in mids.values()), [3, 8], mids)


class TestCustomJobs(JobsTestCase):
    def test_handler_output_in_succeeded_status(self):
        otad = self.start_connected()
        self.service.queue_job(self.thing, "hello-1", {"operation": "hello", "n": 7})
        status, execution = self.final("hello-1")
        self.assertEqual(status, "SUCCEEDED")
        details = execution["statusDetails"]
        self.assertEqual(details["reason"], "exit status 0")
        self.assertEqual(details["stdout"],
                         'hello from %s job hello-1 stdin: {"operation":"hello","n":7}' % self.thing)
        # IN_PROGRESS first, then the terminal status, each accepted.
        statuses = [(u["request"]["status"], u["outcome"]) for u in self.updates("hello-1")]
        self.assertEqual(statuses, [("IN_PROGRESS", "accepted"), ("SUCCEEDED", "accepted")])
        self.assertTrue(otad.grep(r"hello\[\d+\] \(stderr\): a warning"))
        self.assertTrue(otad.grep(r"Job hello-1: handler hello finished: exit status 0"))

    def test_handler_inherits_no_socket(self):
        self.start_connected()
        self.service.queue_job(self.thing, "sockets-1", {"operation": "sockets"})
        status, execution = self.final("sockets-1")
        self.assertEqual(status, "SUCCEEDED")
        self.assertEqual(execution["statusDetails"]["stdout"], "0")

    def test_failing_handler_ends_failed(self):
        self.start_connected()
        self.service.queue_job(self.thing, "fail-1", {"operation": "fail3"})
        status, execution = self.final("fail-1")
        self.assertEqual(status, "FAILED")
        self.assertEqual(execution["statusDetails"], {"reason": "exit status 3", "stdout": "disk full"})

    def test_unknown_operation_is_rejected(self):
        otad = self.start_connected()
        self.service.queue_job(self.thing, "unknown-1", {"operation": "reboot-the-moon"})
        status, execution = self.final("unknown-1")
        self.assertEqual(status, "REJECTED")
        self.assertIn('unknown operation "reboot-the-moon"', execution["statusDetails"]["reason"])
        # It did not block the queue.
        self.service.queue_job(self.thing, "unknown-2", {"operation": "hello"})
        self.assertEqual(self.final("unknown-2")[0], "SUCCEEDED")
        self.assert_running(otad)

    def test_unsafe_operation_names_and_files_are_rejected(self):
        self.start_connected()
        self.service.queue_job(self.thing, "unsafe-1", {"operation": "../../bin/sh"})
        status, execution = self.final("unsafe-1")
        self.assertEqual(status, "REJECTED")
        self.assertIn("invalid operation name", execution["statusDetails"]["reason"])
        # Quoted in the reason, cut mid-character and with a C1 control: the
        # REJECTED must still be valid statusDetails, or the queue would hang.
        self.service.queue_job(self.thing, "unsafe-utf8", {"operation": "a" + "\u00e9" * 40 + "\u0085"})
        status, execution = self.final("unsafe-utf8")
        self.assertEqual(status, "REJECTED")
        self.assertTrue(execution["statusDetails"]["reason"].startswith('invalid operation name "a'))
        self.service.queue_job(self.thing, "unsafe-2", {"operation": "writable"})
        status, execution = self.final("unsafe-2")
        self.assertEqual(status, "REJECTED")
        self.assertIn("not writable by group or others", execution["statusDetails"]["reason"])

    def test_two_queued_jobs_run_in_order(self):
        self.start_connected()
        self.service.queue_job(self.thing, "order-1", {"operation": "order"})
        self.service.queue_job(self.thing, "order-2", {"operation": "order"})
        self.assertEqual(self.final("order-1")[0], "SUCCEEDED")
        self.assertEqual(self.final("order-2")[0], "SUCCEEDED")
        with open(os.path.join(self.stack.workdir, "order-" + self.thing)) as f:
            self.assertEqual(f.read().split(), ["order-1", "order-2"])
        # order-2 started only after order-1 was finished.
        updates = self.record.status_updates(thing=self.thing)
        sequence = [(u["job_id"], u["request"]["status"]) for u in updates]
        self.assertEqual(sequence, [("order-1", "IN_PROGRESS"), ("order-1", "SUCCEEDED"),
                                    ("order-2", "IN_PROGRESS"), ("order-2", "SUCCEEDED")])

    def test_cancelled_job_stops_its_handler(self):
        otad = self.start_connected()
        self.service.queue_job(self.thing, "slow-1", {"operation": "slow"})
        self.service.wait_for_status(self.thing, "slow-1", "IN_PROGRESS", JOB_TIMEOUT)
        pidfile = os.path.join(self.stack.workdir, "slow-slow-1.pid")
        wait_until(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), JOB_TIMEOUT, "the handler")
        pid = int(open(pidfile).read())
        self.assertTrue(pid_alive(pid))
        self.service.cancel_job(self.thing, "slow-1")
        wait_until(lambda: not pid_alive(pid), 15, "the cancelled handler to go away")
        otad.wait_for_log(r"Job slow-1: stopping handler slow", 5)
        self.assertEqual(self.service.job_status(self.thing, "slow-1"), "CANCELED")
        # Nothing is reported for a cancelled job: only the IN_PROGRESS.
        time.sleep(1)
        self.assertEqual([u["request"]["status"] for u in self.updates("slow-1")], ["IN_PROGRESS"])
        self.service.queue_job(self.thing, "after-cancel", {"operation": "hello"})
        self.assertEqual(self.final("after-cancel")[0], "SUCCEEDED")

    def test_stopping_otad_kills_the_running_handler(self):
        otad = self.start_connected()
        self.service.queue_job(self.thing, "stop-1", {"operation": "slow"})
        pidfile = os.path.join(self.stack.workdir, "slow-stop-1.pid")
        wait_until(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), JOB_TIMEOUT, "the handler")
        pid = int(open(pidfile).read())
        started = time.monotonic()
        self.assertEqual(otad.stop(timeout=10), 0)
        self.assertLess(time.monotonic() - started, 5, "otad took too long to stop")
        self.assertFalse(pid_alive(pid), "handler survived otad")
        self.assertTrue(otad.grep(r"Job stop-1: otad is stopping, killing handler slow"))
        # Not finished: the service offers it again after a restart.
        self.assertEqual(self.service.job_status(self.thing, "stop-1"), "IN_PROGRESS")

    def test_handler_timeout_fails_the_job(self):
        self.start_connected(jobs={"handler_timeout": 2})
        self.service.queue_job(self.thing, "timeout-1", {"operation": "slow"})
        status, execution = self.final("timeout-1")
        self.assertEqual(status, "FAILED")
        self.assertEqual(execution["statusDetails"]["reason"], "timed out after 2 s")
        pid = int(open(os.path.join(self.stack.workdir, "slow-timeout-1.pid")).read())
        wait_until(lambda: not pid_alive(pid), 10, "the timed-out handler to go away")


class TestSlowService(JobsTestCase):
    def test_answers_slower_than_the_timeout_still_count(self):
        otad = self.start_connected()
        # Every Jobs message to this thing now takes 12 s, more than otad's
        # 10 s reply timeout: it sends again, and the late answers to the
        # first attempts settle the requests.
        self.service.set_faults(self.thing, delay=12)
        self.service.queue_job(self.thing, "slow-service", {"operation": "hello"})
        status, execution = self.final("slow-service", timeout=90)
        self.assertEqual(status, "SUCCEEDED")
        otad.wait_for_log(r"Job slow-service: SUCCEEDED accepted by the service", 30)
        self.assertTrue(otad.grep(r"Job slow-service: no answer to the IN_PROGRESS update within 10 s, sending it again"))
        # The same clientToken on every attempt of one update.
        tokens = {}
        for u in self.updates("slow-service"):
            tokens.setdefault(u["request"]["status"], set()).add(u["request"]["clientToken"])
        self.assertEqual({k: len(v) for k, v in tokens.items()}, {"IN_PROGRESS": 1, "SUCCEEDED": 1})
        self.assert_running(otad)


class TestMalformed(JobsTestCase):
    def test_document_not_json(self):
        otad = self.start_connected()
        # jobDocument is typed "string" in the API: a string that is not JSON.
        self.service.queue_job(self.thing, "notjson-1", "this is not { json")
        status, execution = self.final("notjson-1")
        self.assertEqual(status, "REJECTED")
        self.assertEqual(execution["statusDetails"]["reason"], "the job document is not valid JSON")
        # Where, in the string the document came as.
        self.assertEqual(execution["statusDetails"]["detail"],
                         "an unexpected character ('t') at byte 0 of 18")
        self.assertTrue(otad.grep(r"Job notjson-1: rejecting: the job document is not valid JSON: "))
        self.assert_running(otad)

    def test_message_not_json(self):
        otad = self.start_connected()
        self.notify_next_raw(b"\x00garbage{")
        otad.wait_for_log(r"Ignoring a notify-next message that cannot be read: the job execution message is not "
                          r"valid JSON: an unexpected character \(byte 0x00\) at byte 0 of 9; it names no job to "
                          r"answer", 10)
        self.service.queue_job(self.thing, "after-garbage", {"operation": "hello"})
        self.assertEqual(self.final("after-garbage")[0], "SUCCEEDED")
        self.assert_running(otad)

    # A job whose message cJSON cannot parse must still be answered, or it
    # stays QUEUED with every later job behind it (issue 11).

    def deep_document(self, levels=1000):
        doc = []
        for _ in range(levels - 1):
            doc = [doc]
        return {"operation": "hello", "deep": doc}

    def queue_silently(self, job_id, document):
        """A job the stand-in knows, whose notify-next the test sends itself."""
        self.service.jobs.queue(self.thing, job_id, document)

    def notify_next_for(self, job_id, document_bytes):
        self.notify_next_raw(b'{"timestamp":1,"execution":{"jobId":"' + job_id.encode() +
                             b'","status":"QUEUED","queuedAt":1,"versionNumber":1,"executionNumber":1,'
                             b'"jobDocument":' + document_bytes + b'}}')

    def test_document_nested_too_deep_is_rejected(self):
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))   # the stand-in's json.dumps
        otad = self.start_connected()
        self.service.queue_job(self.thing, "deep-1", self.deep_document())
        self.service.queue_job(self.thing, "after-deep", {"operation": "hello"})
        status, execution = self.final("deep-1")
        self.assertEqual(status, "REJECTED")
        self.assertEqual(execution["statusDetails"]["reason"],
                         "the job document nests arrays and objects deeper than 1000 levels")
        self.assertRegex(execution["statusDetails"]["detail"],
                         r"^level 1001 begins at byte \d+ of \d+; otad parses at most 1000 levels$")
        self.assertFalse(otad.grep(r"not a JSON object"))
        # The queue moved on.
        self.assertEqual(self.final("after-deep")[0], "SUCCEEDED")
        self.assert_running(otad)

    def test_document_nested_too_deep_found_by_next_get(self):
        # Queued before otad starts: the answer to its $next/get carries it.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
        self.service.queue_job(self.thing, "deep-2", self.deep_document())
        otad = self.start_otad()
        status, execution = self.final("deep-2")
        self.assertEqual(status, "REJECTED")
        self.assertIn("deeper than 1000 levels", execution["statusDetails"]["reason"])
        # Answered once, not asked again and again.
        time.sleep(1)
        self.assertLessEqual(self.next_get_count(), 3)
        self.assertFalse(otad.grep(r"No answer to \$next/get yet"))
        self.assert_running(otad)

    def test_truncated_message_is_rejected(self):
        otad = self.start_connected()
        self.queue_silently("trunc-1", {"operation": "hello"})
        truncated = b'{"timestamp":1,"execution":{"jobId":"trunc-1","status":"QUEUED","jobDocument":{"operation":"hel'
        self.notify_next_raw(truncated)
        status, execution = self.final("trunc-1")
        self.assertEqual(status, "REJECTED")
        self.assertEqual(execution["statusDetails"]["reason"], "the job document is not valid JSON")
        self.assertEqual(execution["statusDetails"]["detail"], "the text ends inside a string (%d bytes)" % len(truncated))
        self.assert_running(otad)

    def test_invalid_utf8_is_rejected(self):
        # cJSON would take it; a handler must never get anything but UTF-8.
        otad = self.start_connected()
        self.queue_silently("utf8-1", {"operation": "hello"})
        self.notify_next_for("utf8-1", b'{"operation":"hello","note":"caf\xe9"}')
        status, execution = self.final("utf8-1")
        self.assertEqual(status, "REJECTED")
        self.assertEqual(execution["statusDetails"]["reason"], "the job document is not valid UTF-8")
        self.assertRegex(execution["statusDetails"]["detail"], r"^byte 0xe9 at offset \d+ of \d+ is not valid UTF-8$")
        self.assertFalse(otad.grep(r"hello\[\d+\]"), "the handler ran")
        self.assert_running(otad)

    def test_message_over_128_kib_is_rejected(self):
        otad = self.start_connected()
        self.queue_silently("huge-1", {"operation": "hello"})
        self.notify_next_for("huge-1", b'{"operation":"hello","pad":"' + b"x" * 140000 + b'"}')
        status, execution = self.final("huge-1")
        self.assertEqual(status, "REJECTED")
        self.assertEqual(execution["statusDetails"]["reason"], "the job execution message is too large")
        self.assertRegex(execution["statusDetails"]["detail"],
                         r"^\d+ bytes; AWS IoT sends at most 131072 in one message$")
        self.assert_running(otad)

    def test_unreadable_message_with_a_bad_job_id_is_not_answered(self):
        # Its update topic would be invalid: nothing can be sent for it.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
        otad = self.start_connected()
        self.notify_next_for("bad id", json.dumps(self.deep_document()).encode())
        otad.wait_for_log(r"Ignoring a notify-next message that cannot be read \(the job document nests arrays and "
                          r"objects deeper than 1000 levels: .*\): its jobId is not 1-64 of \[a-zA-Z0-9_-\]", 10)
        self.assertEqual(self.record.status_updates(thing=self.thing), [])
        self.assert_running(otad)

    def test_wrong_types(self):
        otad = self.start_connected()
        self.service.queue_job(self.thing, "types-1", {"operation": 42})
        status, execution = self.final("types-1")
        self.assertEqual(status, "REJECTED")
        self.assertEqual(execution["statusDetails"]["reason"], "the job document's \"operation\" must be a string")
        self.assertTrue(otad.grep(r"Job types-1: rejecting: .*must be a string"))
        self.service.queue_job(self.thing, "types-2", ["an", "array"])
        status, execution = self.final("types-2")
        self.assertEqual(status, "REJECTED")
        self.assertEqual(execution["statusDetails"]["reason"], "the job document is not a JSON object")
        self.assertEqual(execution["statusDetails"]["detail"], "it is an array")
        self.assert_running(otad)

    def test_document_over_32_kib(self):
        otad = self.start_connected()
        self.queue_oversize("big-1", {"operation": "hello", "pad": "x" * 40 * 1024})
        status, execution = self.final("big-1")
        self.assertEqual(status, "REJECTED")
        self.assertRegex(execution["statusDetails"]["reason"],
                         r"^the job document is \d+ bytes, more than AWS's limit of 32768$")
        # The handler never ran.
        self.assertEqual([u["request"]["status"] for u in self.updates("big-1")], ["REJECTED"])
        self.assert_running(otad)

    def test_bad_job_id(self):
        otad = self.start_connected()
        for bad in ("bad id with spaces", "x" * 65, "../escape"):
            self.notify_next_raw(json.dumps({"timestamp": 1, "execution": {
                "jobId": bad, "status": "QUEUED", "versionNumber": 1, "executionNumber": 1,
                "jobDocument": {"operation": "hello"}}}).encode())
            otad.wait_for_log(r"Ignoring job '%s" % bad[:20].replace(".", r"\."), 10)
        # An id we cannot put in an update topic is never answered: nothing
        # was published for it, and the next real job still runs.
        self.assertEqual(self.record.status_updates(thing=self.thing), [])
        self.service.queue_job(self.thing, "after-bad-id", {"operation": "hello"})
        self.assertEqual(self.final("after-bad-id")[0], "SUCCEEDED")
        self.assert_running(otad)

    def test_ota_document_without_ota_handler_does_not_block(self):
        # Until an afr_ota handler is registered, such a job must end.
        otad = self.start_connected()
        self.service.queue_job(self.thing, "AFR_OTA-x", {"afr_ota": {"protocols": ["MQTT"], "files": []}})
        status, execution = self.final("AFR_OTA-x")
        self.assertIn(status, ("REJECTED", "FAILED"))
        self.assertTrue(execution["statusDetails"].get("reason"))
        self.service.queue_job(self.thing, "after-ota", {"operation": "hello"})
        self.assertEqual(self.final("after-ota")[0], "SUCCEEDED")
        self.assert_running(otad)


class NotifySocket:
    """systemd's side of sd_notify: every STATUS= otad sends, in order."""

    def __init__(self, path):
        import threading
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.statuses = []
        self.running = True
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self):
        while self.running:
            try:
                data = self.sock.recv(65536).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            self.statuses += [line[7:] for line in data.split("\n") if line.startswith("STATUS=")]

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()

    def wait_for(self, pattern, timeout, since=0):
        """Waits for a STATUS= matching pattern among those from index since on."""
        rx = re.compile(pattern)
        wait_until(lambda: any(rx.search(st) for st in self.statuses[since:]), timeout,
                   "STATUS= matching %r; got %r" % (pattern, self.statuses[-5:]))

    def last(self):
        return self.statuses[-1] if self.statuses else None


class TestStatus(JobsTestCase):
    """The STATUS= line of `systemctl status otad`: the session's link and
    the job, composed from what each module said, so that a reconnect never
    hides the job that runs (issue 9)."""

    def test_reconnect_keeps_the_job_in_the_line(self):
        notify = NotifySocket(os.path.join(self.stack.workdir, "notify-" + self.thing))
        self.addCleanup(notify.close)
        otad = self.stack.start_otad(self.thing, {"mqtt": dict(FAST_RECONNECT),
                                                  "jobs": {"handler_dir": self.handlers}},
                                     env={"NOTIFY_SOCKET": notify.path})
        self.addCleanup(otad.stop)
        port = self.stack.broker.port
        notify.wait_for(r"^connected to localhost:%d; no pending job$" % port, CONNECT_TIMEOUT)
        self.service.queue_job(self.thing, "status-1", {"operation": "slow"})
        running = "job status-1 \\(custom\\)"
        notify.wait_for(r"^connected to localhost:%d; %s$" % (port, running), JOB_TIMEOUT)
        started = len(notify.statuses)

        self.service.restart_broker(down_seconds=1.0)
        notify.wait_for(r"^reconnecting in \d+ s: .*; %s$" % running, CONNECT_TIMEOUT)
        wait_until(lambda: len(otad.grep(r"Connected to localhost")) >= 2, CONNECT_TIMEOUT, "the reconnect")
        # Connected again, and still saying which job runs.
        wait_until(lambda: re.match(r"^connected to localhost:%d; %s$" % (port, running), notify.last() or ""),
                   CONNECT_TIMEOUT, "the line after the reconnect, last %r" % notify.last())
        # While the job ran, no line lost it.
        self.assertFalse([st for st in notify.statuses[started:] if "status-1" not in st], notify.statuses)

        cancelled = len(notify.statuses)
        self.service.cancel_job(self.thing, "status-1")
        notify.wait_for(r"^connected to localhost:%d; no pending job$" % port, JOB_TIMEOUT, since=cancelled)
        self.assertTrue([st for st in notify.statuses if st.endswith("; job status-1 no longer offered")], notify.statuses)


class TestProgressReplies(JobsTestCase):
    """The service answers our QoS 0 "receive" progress updates too; those
    answers are ours, expected, and logged as such (issue 10)."""

    def test_progress_answers_are_recognised(self):
        trust = os.path.join(self.stack.workdir, "trust-" + self.thing)
        out = os.path.join(self.stack.workdir, "out-" + self.thing)
        os.makedirs(trust)
        os.makedirs(out)
        shutil.copy(self.stack.pki.signer_cert, os.path.join(trust, "ota-signer.crt"))
        otad = self.stack.start_otad(self.thing, {
            "mqtt": dict(FAST_RECONNECT),
            # 96 blocks at 24 requests/s: about 4 s, a "receive" every second.
            "ota": {"trust_dir": trust, "block_size": 1024, "window": 1, "max_requests_per_second": 24,
                    "progress_interval": 1},
            "update": {"version": "1.0.0"},
            "target.app": {"type": "file", "directory": out},
        })
        self.addCleanup(otad.stop)
        image = os.urandom(96 * 1024)
        self.service.queue_ota_job(self.thing, "AFR_OTA-progress", image, protocols=["MQTT"])
        status = self.service.wait_terminal(self.thing, "AFR_OTA-progress", 60)
        self.assertEqual(status, "SUCCEEDED", otad.log()[-3000:])
        receives = [u for u in self.updates("AFR_OTA-progress")
                    if "receive" in (u["request"].get("statusDetails") or {})]
        self.assertGreaterEqual(len(receives), 2, receives)
        # Every progress update was answered, and every answer was ours.
        wait_until(lambda: len(otad.grep(r"progress update \S+ accepted by the service")) >= len(receives),
                   10, "the answers to %d progress updates" % len(receives))
        self.assertFalse(otad.grep(r"answers no request of ours"))


class TestBrokerRestart(JobsTestCase):
    def test_reconnects_and_asks_next_again(self):
        self.check_restart(clean_session=True)

    def test_persistent_session_resubscribes_when_session_is_gone(self):
        # The stand-in's broker keeps no state across a restart, so the
        # CONNACK says sessionPresent=0 and otad must subscribe again.
        self.check_restart(clean_session=False)
        self.assertTrue(self.otad.grep(r"Connected to localhost:\d+ \(address 127\.0\.0\.1\) as %s \(persistent session\)"
                                       % self.thing))

    def check_restart(self, clean_session):
        otad = self.otad = self.start_connected(mqtt={"clean_session": clean_session})
        self.service.queue_job(self.thing, "restart-1", {"operation": "nap3"})
        self.service.wait_for_status(self.thing, "restart-1", "IN_PROGRESS", JOB_TIMEOUT)
        asked = self.next_get_count()
        # Down while the handler runs: its SUCCEEDED waits for the reconnect.
        self.service.restart_broker(down_seconds=1.0)
        otad.wait_for_log(r"Disconnected from localhost", 10)
        wait_until(lambda: len(otad.grep(r"Connected to localhost")) >= 2, CONNECT_TIMEOUT, "the reconnect")
        wait_until(lambda: self.next_get_count() > asked, CONNECT_TIMEOUT, "$next/get after the reconnect")
        status, execution = self.final("restart-1")
        self.assertEqual(status, "SUCCEEDED")
        self.assertEqual(execution["statusDetails"]["stdout"], "rested")
        # The $next/get answer after the reconnect named the running job
        # again: the same job, not a second run.
        self.assertEqual(len(otad.grep(r"Job restart-1: started .*nap3")), 1)
        # (IN_PROGRESS may go twice: one whose answer the restart swallowed
        # is sent again after the reconnect.)
        statuses = [u["request"]["status"] for u in self.updates("restart-1")]
        self.assertEqual(statuses[-1], "SUCCEEDED")
        self.assertEqual(set(statuses[:-1]), {"IN_PROGRESS"})
        # Subscriptions are back: the next job arrives through notify-next.
        self.service.queue_job(self.thing, "restart-2", {"operation": "hello"})
        self.assertEqual(self.final("restart-2")[0], "SUCCEEDED")
        self.assert_running(otad)


if __name__ == "__main__":
    unittest.main()
