#!/usr/bin/python3
"""AWS IoT Jobs device API (protocol.md §1), as a state machine per thing.

Owns: the job executions of every thing and the rules of the MQTT Jobs API.
Handlers take a decoded request and return the messages to publish as
(topic, payload-dict) pairs; this module never touches the network.
"""

import re
import threading
import time

TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}
DEVICE_STATUSES = {"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"}
JOB_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")           # §1.7
DETAIL_KEY_RE = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")     # §1.5
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")           # \p{Cc}
MAX_DETAILS = 10
MAX_DETAIL_VALUE = 1024
MAX_CLIENT_TOKEN = 64


def now():
    return int(time.time())


class JobsError(Exception):
    """A request the service answers on …/rejected (§1.6)."""

    def __init__(self, code, message, execution=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.execution = execution


class Execution:
    def __init__(self, thing, job_id, document, seq):
        t = now()
        self.thing = thing
        self.job_id = job_id
        # A dict, or a callable returning one per delivery (OTA jobs get a
        # fresh presigned URL every time the document goes out, §4).
        self.document = document
        self.seq = seq
        self.status = "QUEUED"
        self.status_details = {}
        self.queued_at = t
        self.started_at = None
        self.last_updated_at = t
        self.version = 1
        self.execution_number = 1

    def render_document(self):
        doc = self.document
        return doc() if callable(doc) else doc

    def state(self):
        """JobExecutionState: what UpdateJobExecution returns and rejects carry."""
        return {"status": self.status, "statusDetails": dict(self.status_details),
                "versionNumber": self.version}

    def full(self, include_document=True):
        e = {"jobId": self.job_id, "thingName": self.thing,
             "status": self.status, "queuedAt": self.queued_at,
             "lastUpdatedAt": self.last_updated_at,
             "versionNumber": self.version,
             "executionNumber": self.execution_number}
        if self.status_details:
            e["statusDetails"] = dict(self.status_details)
        if self.started_at is not None:
            e["startedAt"] = self.started_at
        if include_document:
            e["jobDocument"] = self.render_document()
        return e

    def summary(self):
        s = {"jobId": self.job_id, "queuedAt": self.queued_at,
             "lastUpdatedAt": self.last_updated_at,
             "versionNumber": self.version,
             "executionNumber": self.execution_number}
        if self.started_at is not None:
            s["startedAt"] = self.started_at
        return s


def validate_status_details(details):
    if not isinstance(details, dict):
        raise JobsError("InvalidRequest", "statusDetails must be an object")
    if len(details) > MAX_DETAILS:
        raise JobsError("InvalidRequest",
                        "statusDetails has %d pairs, at most %d allowed"
                        % (len(details), MAX_DETAILS))
    for k, v in details.items():
        if not DETAIL_KEY_RE.match(k):
            raise JobsError("InvalidRequest", "invalid statusDetails key %r" % k)
        if (not isinstance(v, str) or not 1 <= len(v) <= MAX_DETAIL_VALUE
                or CONTROL_RE.search(v)):
            raise JobsError("InvalidRequest",
                            "invalid statusDetails value for key %r" % k)


def parse_expected_version(value):
    # AWS SDKs send a number, the embedded Jobs library a quoted one (§1.3).
    if isinstance(value, bool):
        raise JobsError("InvalidRequest", "expectedVersion must be a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise JobsError("InvalidRequest", "expectedVersion must be a number")


class Jobs:
    """All things' job executions. Thread-safe; handlers return publishes."""

    def __init__(self):
        self._lock = threading.RLock()
        self._executions = {}     # thing -> {job_id: Execution}, creation order
        self._last_next = {}      # thing -> job id announced by notify-next
        self._last_pending = {}   # thing -> pending set announced by notify
        self._seq = 0
        self._changed = threading.Condition(self._lock)

    @staticmethod
    def topic(thing, suffix):
        return "$aws/things/%s/jobs/%s" % (thing, suffix)

    # ---- service side (what an operator does in the console) -------------

    def queue(self, thing, job_id, document):
        if not JOB_ID_RE.match(job_id):
            raise ValueError("invalid job id %r (§1.7)" % job_id)
        with self._lock:
            execs = self._executions.setdefault(thing, {})
            if job_id in execs:
                raise ValueError("job %s already exists for %s" % (job_id, thing))
            self._seq += 1
            execs[job_id] = Execution(thing, job_id, document, self._seq)
            self._changed.notify_all()
            return self._notifications(thing)

    def cancel(self, thing, job_id):
        """CancelJobExecution with force=true: also cancels IN_PROGRESS."""
        with self._lock:
            e = self._get(thing, job_id)
            if e.status in TERMINAL:
                raise ValueError("job %s is already %s" % (job_id, e.status))
            e.status = "CANCELED"
            e.version += 1
            e.last_updated_at = now()
            self._changed.notify_all()
            return self._notifications(thing)

    def status(self, thing, job_id):
        with self._lock:
            e = self._executions.get(thing, {}).get(job_id)
            return None if e is None else e.status

    def execution(self, thing, job_id):
        """A snapshot of the execution without rendering its document."""
        with self._lock:
            return self._get(thing, job_id).full(include_document=False)

    def document(self, thing, job_id):
        """The job document as the next delivery would carry it."""
        with self._lock:
            return self._get(thing, job_id).render_document()

    def wait_for_status(self, thing, job_id, statuses, timeout):
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                s = self.status(thing, job_id)
                if s in statuses:
                    return s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("job %s of %s is %s after %.0f s, wanted %s"
                                       % (job_id, thing, s, timeout, sorted(statuses)))
                self._changed.wait(min(left, 0.5))

    def _get(self, thing, job_id):
        e = self._executions.get(thing, {}).get(job_id)
        if e is None:
            raise JobsError("ResourceNotFound",
                            "job execution %s not found for %s" % (job_id, thing))
        return e

    def _pending(self, thing):
        execs = self._executions.get(thing, {}).values()
        in_progress = [e for e in execs if e.status == "IN_PROGRESS"]
        queued = [e for e in execs if e.status == "QUEUED"]
        key = lambda e: e.seq
        return sorted(in_progress, key=key), sorted(queued, key=key)

    def _next(self, thing):
        """$next: IN_PROGRESS first, then QUEUED, each in creation order."""
        in_progress, queued = self._pending(thing)
        return (in_progress + queued or [None])[0]

    def _notifications(self, thing):
        """notify-next only when *which* job is next changes; notify when the
        pending list changes (§1.2, jobs-comm-notifications)."""
        out = []
        in_progress, queued = self._pending(thing)
        pending = tuple((e.job_id, e.status) for e in in_progress + queued)
        if pending != self._last_pending.get(thing, ()):
            self._last_pending[thing] = pending
            # At most 10 pending executions are listed, IN_PROGRESS first;
            # empty lists are left out, so an empty queue gives "jobs":{}
            # (jobs-comm-notifications, ListNotification).
            listed = (in_progress + queued)[:10]
            jobs = {}
            for status in ("IN_PROGRESS", "QUEUED"):
                summaries = [e.summary() for e in listed if e.status == status]
                if summaries:
                    jobs[status] = summaries
            out.append((self.topic(thing, "notify"),
                        {"timestamp": now(), "jobs": jobs}))
        nxt = self._next(thing)
        next_id = nxt.job_id if nxt else None
        if next_id != self._last_next.get(thing):
            self._last_next[thing] = next_id
            msg = {"timestamp": now()}
            if nxt:
                msg["execution"] = nxt.full()
            out.append((self.topic(thing, "notify-next"), msg))
        return out

    # ---- device side: the MQTT API -----------------------------------------

    def handle(self, thing, api, job_id, request):
        """api is 'get', 'start-next', 'describe' or 'update'. Returns
        (outcome, [(topic, payload)]), outcome 'accepted'/'rejected'.
        The request topic's base is jobs/get, jobs/start-next,
        jobs/<id>/get or jobs/<id>/update."""
        base = {"get": "get", "start-next": "start-next",
                "describe": "%s/get" % job_id, "update": "%s/update" % job_id}[api]
        token = request.get("clientToken") if isinstance(request, dict) else None
        with self._lock:
            try:
                if not isinstance(request, dict):
                    raise JobsError("InvalidJson", "request is not a JSON object")
                if token is not None and (not isinstance(token, str)
                                          or len(token.encode()) > MAX_CLIENT_TOKEN):
                    token = None
                    raise JobsError("InvalidRequest", "invalid clientToken")
                handler = {"get": self._get_pending, "start-next": self._start_next,
                           "describe": self._describe, "update": self._update}[api]
                body = handler(thing, job_id, request)
            except JobsError as err:
                body = {"code": err.code, "message": err.message,
                        "timestamp": now()}
                if token is not None:
                    body["clientToken"] = token
                if err.execution is not None:
                    body["executionState"] = err.execution.state()
                return "rejected", [(self.topic(thing, base + "/rejected"), body)]
            body["timestamp"] = now()
            if token is not None:
                body["clientToken"] = token
            self._changed.notify_all()
            out = [(self.topic(thing, base + "/accepted"), body)]
            return "accepted", out + self._notifications(thing)

    def _get_pending(self, thing, job_id, request):
        in_progress, queued = self._pending(thing)
        return {"inProgressJobs": [e.summary() for e in in_progress],
                "queuedJobs": [e.summary() for e in queued]}

    def _describe(self, thing, job_id, request):
        include_doc = request.get("includeJobDocument", True)
        if job_id == "$next":
            e = self._next(thing)
            return {"execution": e.full(include_doc)} if e else {}
        e = self._get(thing, job_id)
        number = request.get("executionNumber")
        if number is not None and number != e.execution_number:
            raise JobsError("ResourceNotFound", "no execution number %s" % number)
        if e.status in TERMINAL:
            raise JobsError("TerminalStateReached",
                            "job execution %s is %s" % (job_id, e.status))
        return {"execution": e.full(include_doc)}

    def _start_next(self, thing, job_id, request):
        details = request.get("statusDetails")
        if details is not None:
            validate_status_details(details)
        self._check_step_timeout(request, allow_discard=False)
        e = self._next(thing)
        if e is None:
            return {}
        if e.status == "QUEUED":
            # Details are set only when the job leaves QUEUED (§1.3).
            t = now()
            e.status = "IN_PROGRESS"
            e.started_at = e.started_at or t
            e.last_updated_at = t
            e.version += 1
            if details is not None:
                e.status_details = dict(details)
        return {"execution": e.full()}

    def _update(self, thing, job_id, request):
        status = request.get("status")
        if status not in DEVICE_STATUSES:
            raise JobsError("InvalidRequest", "status must be one of %s"
                            % ", ".join(sorted(DEVICE_STATUSES)))
        details = request.get("statusDetails")
        if details is not None:
            validate_status_details(details)
        self._check_step_timeout(request, allow_discard=True)
        e = self._get(thing, job_id)
        number = request.get("executionNumber")
        if number is not None and number != e.execution_number:
            raise JobsError("ResourceNotFound", "no execution number %s" % number)
        if "expectedVersion" in request:
            expected = parse_expected_version(request["expectedVersion"])
            if expected != e.version:
                raise JobsError("VersionMismatch",
                                "expected version %d, current is %d"
                                % (expected, e.version), e)
        if e.status in TERMINAL:
            raise JobsError("InvalidStateTransition",
                            "job execution is in terminal state %s" % e.status, e)
        if e.status == "IN_PROGRESS" and status == "REJECTED":
            # "Job service will not allow us to set REJECTED after the job
            # has been started already" (OTA-lib ota.c, §1.4).
            raise JobsError("InvalidStateTransition",
                            "cannot go from IN_PROGRESS to REJECTED", e)
        t = now()
        if e.status == "QUEUED":
            e.started_at = t
        e.status = status
        if details is not None:
            # [INF §1.3] a present map is the full new map.
            e.status_details = dict(details)
        e.last_updated_at = t
        e.version += 1
        body = {}
        if request.get("includeJobExecutionState"):
            body["executionState"] = e.state()
        if request.get("includeJobDocument"):
            body["jobDocument"] = e.render_document()
        return body

    @staticmethod
    def _check_step_timeout(request, allow_discard):
        if "stepTimeoutInMinutes" not in request:
            return
        v = request["stepTimeoutInMinutes"]
        ok = isinstance(v, int) and not isinstance(v, bool) and (
            1 <= v <= 10080 or (allow_discard and v == -1))
        if not ok:
            raise JobsError("InvalidRequest", "stepTimeoutInMinutes out of range")
