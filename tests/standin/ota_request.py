#!/usr/bin/python3
"""CreateOTAUpdate and CreateStream requests, as the AWS CLI sends them from
`--cli-input-json`, checked against the AWS IoT service model that Debian's
python3-botocore ships and mapped to what the stand-in serves.

Owns: the validation (botocore's own ParamValidator, a schema no one here
wrote) and the mapping of an OTA update to an afr_ota job the way the OTA
Update Manager does it:
  * job id "AFR_OTA-" + otaUpdateId, for each thing ARN of `targets`;
  * files[] in request order; `fileName` -> filepath, `fileType` -> fileType
    (default 0), customCodeSigning `certificateChain.certificateName` ->
    certfile, and the signature under "sig-<hashAlgorithm>-<signatureAlgorithm>"
    lowercased (protocol.md §5) as base64 of the signature bytes;
  * S3 locations: for MQTT a new stream AFR_OTA-<uuid> holding file i as
    file id i [INF: AWS documents no other numbering for multi-file
    updates]; for HTTP a presigned URL per file;
  * stream locations: the stream must exist (CreateStream first) and every
    file must be in the same one; its file ids are the job's fileid; HTTP
    cannot serve them (AWS: HTTP needs S3 files).
Where this differs from AWS: S3 objects are files under one directory
(bucket ignored, key = relative path); AWS Signer (awsSignerJobId,
startSigningJobParameter) and thing groups are refused.
Never touches the network.
"""

import base64
import os
import re

_MODEL = None
THING_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iot:[^:]*:[^:]*:thing/([a-zA-Z0-9:_-]{1,128})$")


class RequestError(ValueError):
    """What AWS answers with InvalidRequestException / ParamValidationError."""


def service_model():
    global _MODEL
    if _MODEL is None:
        import botocore.session
        _MODEL = botocore.session.get_session().get_service_model("iot")
    return _MODEL


def validate(operation, request):
    """Raises RequestError with botocore's report when `request` is not a
    valid input of `operation` (e.g. "CreateOTAUpdate") in AWS's model."""
    import botocore.validate
    shape = service_model().operation_model(operation).input_shape
    report = botocore.validate.ParamValidator().validate(request, shape)
    if report.has_errors():
        raise RequestError(report.generate_report())


def read_object(files_dir, s3):
    key = s3["key"]
    path = os.path.normpath(os.path.join(files_dir, key))
    if os.path.isabs(key) or not path.startswith(os.path.normpath(files_dir) + os.sep):
        raise RequestError("S3 key %r leaves the bucket directory" % key)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RequestError("NoSuchKey: s3://%s/%s" % (s3["bucket"], key))


def _signature(f):
    cs = f.get("codeSigning") or {}
    if "awsSignerJobId" in cs or "startSigningJobParameter" in cs:
        raise RequestError("the stand-in supports customCodeSigning only")
    custom = cs.get("customCodeSigning")
    if not custom or "signature" not in custom:
        raise RequestError("file %s has no customCodeSigning signature" % f.get("fileName"))
    blob = custom["signature"]["inlineDocument"]
    # A blob in CLI input JSON is base64 text (AWS CLI v2's default
    # cli_binary_format); the service stores the bytes and the job carries
    # them in base64 again.
    raw = base64.b64decode(blob, validate=True) if isinstance(blob, str) else bytes(blob)
    key = "sig-%s-%s" % (custom.get("hashAlgorithm", "").lower(),
                         custom.get("signatureAlgorithm", "").lower())
    certfile = (custom.get("certificateChain") or {}).get("certificateName")
    return key, base64.b64encode(raw).decode(), certfile


def plan(request, files_dir, streams):
    """What create_ota_update() queues: {"job_id", "things", "protocols",
    "stream_id", "stream_exists", "url_lifetime", "files": [specs for
    AwsIot.queue_ota_job]}."""
    validate("CreateOTAUpdate", request)
    things = []
    for target in request["targets"]:
        m = THING_ARN_RE.match(target)
        if not m:
            raise RequestError("target %r is not a thing ARN (the stand-in has no thing groups)" % target)
        things.append(m.group(1))
    protocols = list(request.get("protocols") or ["MQTT"])
    if len(request["files"]) > 50:
        raise RequestError("%d files: an OTA update's stream holds at most 50" % len(request["files"]))

    stream_ids = set()
    specs = []
    for n, f in enumerate(request["files"]):
        loc = f.get("fileLocation") or {}
        if "stream" in loc:
            sid, fid = loc["stream"].get("streamId"), loc["stream"].get("fileId")
            stream = streams.get(sid) if sid else None
            if stream is None or fid not in stream.files:
                raise RequestError("ResourceNotFound: stream %s file %s" % (sid, fid))
            stream_ids.add(sid)
            data, fileid = stream.files[fid], fid
        elif "s3Location" in loc:
            stream_ids.add(None)
            data, fileid = read_object(files_dir, loc["s3Location"]), n
        else:
            raise RequestError("file %d has no fileLocation" % n)
        sig_key, signature, certfile = _signature(f)
        specs.append({"data": data, "filepath": f.get("fileName", ""), "fileid": fileid,
                      "fileType": f.get("fileType", 0), "certfile": certfile,
                      "signature": signature, "sig_key": sig_key})
    if len(stream_ids) > 1:
        raise RequestError("files must all be in one stream, or all in S3")
    stream_id = stream_ids.pop()
    if stream_id and "HTTP" in protocols:
        raise RequestError("HTTP needs S3 file locations, not a stream")
    lifetime = (request.get("awsJobPresignedUrlConfig") or {}).get("expiresInSec")
    return {"job_id": "AFR_OTA-" + request["otaUpdateId"], "things": things,
            "protocols": protocols, "stream_id": stream_id,
            "stream_exists": stream_id is not None, "url_lifetime": lifetime,
            "files": specs}
