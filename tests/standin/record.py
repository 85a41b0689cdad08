#!/usr/bin/python3
"""Thread-safe log of what the stand-in saw and did, for tests to assert on.

Owns: lists of events appended by the service threads (MQTT callbacks, stream
senders, HTTPS handlers). Never decides anything itself.
"""

import copy
import threading
import time


class Record:
    def __init__(self):
        self._cond = threading.Condition()
        self._status_updates = []   # UpdateJobExecution requests + outcome
        self._requests = []         # every Jobs/Streams request served
        self._http = []             # every HTTP request
        self._sent = []             # every MQTT message published to a thing
        self._bytes = {}            # (thing, protocol) -> block bytes served

    def _append(self, lst, entry):
        entry.setdefault("time", time.time())
        with self._cond:
            lst.append(entry)
            self._cond.notify_all()

    def add_status_update(self, thing, job_id, request, outcome, code=None):
        """outcome is 'accepted' or 'rejected' (then code is the error code)."""
        self._append(self._status_updates, {
            "thing": thing, "job_id": job_id,
            "status": request.get("status") if isinstance(request, dict) else None,
            "statusDetails": request.get("statusDetails") if isinstance(request, dict) else None,
            "request": request, "outcome": outcome, "code": code})

    def add_request(self, thing, api, topic, fields):
        self._append(self._requests, {"thing": thing, "api": api,
                                      "topic": topic, "fields": fields})

    def add_http(self, method, path, range_header, status, nbytes, thing=None):
        self._append(self._http, {"method": method, "path": path,
                                  "range": range_header, "status": status,
                                  "bytes": nbytes, "thing": thing})

    def add_sent(self, thing, topic, payload):
        self._append(self._sent, {"thing": thing, "topic": topic,
                                  "size": len(payload)})

    def add_bytes(self, thing, protocol, n):
        with self._cond:
            key = (thing, protocol)
            self._bytes[key] = self._bytes.get(key, 0) + n
            self._cond.notify_all()

    @staticmethod
    def _match(entry, filters):
        return all(entry.get(k) == v for k, v in filters.items() if v is not None)

    def status_updates(self, thing=None, job_id=None, outcome=None):
        with self._cond:
            return [copy.deepcopy(e) for e in self._status_updates
                    if self._match(e, {"thing": thing, "job_id": job_id,
                                       "outcome": outcome})]

    def requests(self, thing=None, api=None):
        """api: 'jobs/get', 'jobs/start-next', 'jobs/describe', 'jobs/update',
        'streams/get', 'streams/describe'."""
        with self._cond:
            return [copy.deepcopy(e) for e in self._requests
                    if self._match(e, {"thing": thing, "api": api})]

    def http_requests(self, status=None):
        with self._cond:
            return [dict(e) for e in self._http
                    if self._match(e, {"status": status})]

    def sent(self, thing=None):
        with self._cond:
            return [dict(e) for e in self._sent if self._match(e, {"thing": thing})]

    def bytes_served(self, thing=None, protocol=None):
        """Block payload bytes served; protocol 'mqtt' or 'https'."""
        with self._cond:
            return sum(n for (t, p), n in self._bytes.items()
                       if thing in (None, t) and protocol in (None, p))

    def wait_until(self, predicate, timeout):
        """Waits until predicate(self) is true; returns its last value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self)
                left = deadline - time.monotonic()
                if value or left <= 0:
                    return value
                self._cond.wait(min(left, 0.5))
