#!/usr/bin/python3
"""A small independent MQTT device client for checking the stand-in.

Owns: one paho connection with a thing's certificate and the list of
messages it received. Deliberately shares no code with the stand-in's
encoders: tests write the request bytes by hand.
"""

import threading
import time

import paho.mqtt.client as mqtt


class Device:
    def __init__(self, stack, thing, cert=None, key=None, client_id=None):
        self.thing = thing
        self._cond = threading.Condition()
        self.messages = []
        self._rc = None
        self._subacks = set()
        self.client = mqtt.Client(client_id=client_id or thing, clean_session=True)
        self.client.tls_set(ca_certs=stack.pki.ca_cert,
                            certfile=cert or stack.pki.client_cert(thing),
                            keyfile=key or stack.pki.client_key(thing))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.port = stack.broker.port

    def _on_connect(self, client, userdata, flags, rc):
        with self._cond:
            self._rc = rc
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, granted):
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.messages.append((time.monotonic(), msg.topic, msg.payload))
            self._cond.notify_all()

    def connect(self, timeout=5):
        """True once CONNACK 0 arrived; False if refused or timed out."""
        try:
            self.client.connect("localhost", self.port, keepalive=30)
        except OSError:
            return False
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._rc is not None, timeout)
            return self._rc == 0

    def close(self):
        try:
            self.client.disconnect()
        except OSError:
            pass        # the broker already dropped us (e.g. refused certificate)
        self.client.loop_stop()

    def subscribe(self, topic_filter, qos=1, timeout=5):
        rc, mid = self.client.subscribe(topic_filter, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, rc
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, timeout), "no SUBACK"

    def publish(self, topic, payload, qos=1):
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish()

    def received(self, topic_filter):
        """(time, topic, payload) of messages whose topic matches the filter."""
        with self._cond:
            return [m for m in self.messages
                    if mqtt.topic_matches_sub(topic_filter, m[1])]

    def wait(self, topic_filter, count=1, timeout=5):
        """The payloads on matching topics once `count` arrived, or what
        arrived by the timeout (the caller's assertion shows it)."""
        deadline = time.monotonic() + timeout
        got, scanned = [], 0
        with self._cond:
            while True:
                # Scan only new messages: streams bring thousands.
                for m in self.messages[scanned:]:
                    if mqtt.topic_matches_sub(topic_filter, m[1]):
                        got.append(m[2])
                scanned = len(self.messages)
                left = deadline - time.monotonic()
                if len(got) >= count or left <= 0:
                    return got
                self._cond.wait(left)

    def clear(self):
        with self._cond:
            self.messages = []
