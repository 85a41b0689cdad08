#!/usr/bin/python3
"""`otad bundle create|inspect|verify` as a user runs it, and the stand-in
taking the ota-update.json it writes:

* ota-update.json and create-stream.json are valid CreateOTAUpdate and
  CreateStream inputs of the AWS IoT service model in Debian's
  python3-botocore (botocore's own ParamValidator);
* every bad input gets its own clear message (image beyond the format,
  unreadable key, key and certificate that differ, output directory not
  empty, a payload needing more parts than a stream holds);
* verify refuses a tampered part, a tampered manifest and a foreign
  certificate;
* the stand-in queues AFR_OTA-<otaUpdateId> from ota-update.json and the
  bundle's files, and src/stream.c (tests/stream-fetch) downloads exactly
  the bundle's bytes from the stream it made; over HTTP the presigned URLs
  serve them.

Run: /usr/bin/python3 tests/standin/tap.py tests/integration/test_bundle_tool.py
"""

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import unittest
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "standin"))

import harness  # noqa: E402
import ota_request  # noqa: E402

OTAD = harness.otad_binary()
BUILD = os.environ.get("OTAD_BUILD_ROOT", os.path.join(os.path.dirname(__file__), "../../build"))
FETCH = os.path.join(BUILD, "tests", "stream-fetch")
MIB = 1024 * 1024


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_signer(directory, stem):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", stem + ".key", "-out", stem + ".crt", "-days", "30", "-subj", "/CN=" + stem,
            "-addext", "extendedKeyUsage=codeSigning", cwd=directory)
    return os.path.join(directory, stem + ".key"), os.path.join(directory, stem + ".crt")


def make_image(path, size, seed):
    """Text, zeros and noise, as a file system holds them."""
    import random
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rnd.randrange(3)
        run = rnd.randrange(1000, 40000)
        if kind == 0:
            out += bytes(run)
        elif kind == 1:
            out += (b"otad bundle %d " % rnd.randrange(1000)) * (run // 16)
        else:
            out += rnd.randbytes(run)
    with open(path, "wb") as f:
        f.write(out[:size])


class BundleTool(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="otad-bundle-tool-")
        cls.key, cls.cert = make_signer(cls.tmp, "signer")
        cls.other_key, cls.other_cert = make_signer(cls.tmp, "other")
        cls.image = os.path.join(cls.tmp, "rootfs.img")
        make_image(cls.image, 6 * MIB, 1)

    @classmethod
    def tearDownClass(cls):
        if not os.environ.get("OTAD_KEEP_TMP"):
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def bundle(self, *args, key=None, cert=None, image=None, out=None, version="2.0.0", check=True):
        out = out or tempfile.mkdtemp(prefix="out-", dir=self.tmp)
        argv = [OTAD, "bundle", "create", "--key", key or self.key, "--cert", cert or self.cert,
                "--version", version, "--compatible", "test-board", *args, image or self.image, out]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if check:
            self.assertEqual(p.returncode, 0, p.stderr)
        return out, p

    def refused(self, p, message):
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn(message, p.stderr)
        self.assertTrue(p.stderr.startswith("otad bundle: "), p.stderr)

    # ---- the AWS requests ----------------------------------------------

    def test_ota_update_json_is_a_valid_create_ota_update(self):
        out, p = self.bundle("--part-size", str(MIB), "--bucket", "my-bucket", "--prefix", "rootfs/",
                             "--target", "arn:aws:iot:eu-west-1:123456789012:thing/gw-1",
                             "--role-arn", "arn:aws:iam::123456789012:role/ota")
        with open(os.path.join(out, "ota-update.json")) as f:
            req = json.load(f)
        ota_request.validate("CreateOTAUpdate", req)   # raises on any error
        with open(os.path.join(out, "bundle-2.0.0.manifest")) as f:
            manifest = json.load(f)
        names = [f["fileName"] for f in req["files"]]
        self.assertEqual(names, ["bundle-2.0.0.manifest"] + [p["file"] for p in manifest["parts"]])
        self.assertGreater(len(manifest["parts"]), 1)
        for f in req["files"]:
            self.assertEqual(f["fileLocation"]["s3Location"], {"bucket": "my-bucket", "key": "rootfs/" + f["fileName"]})
            ccs = f["codeSigning"]["customCodeSigning"]
            self.assertEqual((ccs["hashAlgorithm"], ccs["signatureAlgorithm"]), ("SHA256", "ECDSA"))
            self.assertEqual(ccs["certificateChain"]["certificateName"], "signer.crt")
            sig = base64.b64decode(ccs["signature"]["inlineDocument"], validate=True)
            self.assertEqual(sig[0], 0x30, "DER SEQUENCE")
            with open(os.path.join(out, f["fileName"] + ".sig")) as s:
                self.assertEqual(s.read().strip(), ccs["signature"]["inlineDocument"])
        # The aws s3 cp lines, one per file, into the same keys.
        self.assertIn("aws s3 cp bundle-2.0.0.manifest s3://my-bucket/rootfs/bundle-2.0.0.manifest", p.stdout)
        with open(os.path.join(out, "upload.sh")) as f:
            script = f.read()
        self.assertEqual(script.count("aws s3 cp "), len(req["files"]))
        self.assertIn("aws iot create-ota-update --cli-input-json file://ota-update.json", script)

    def test_stream_locations_and_create_stream_json(self):
        out, _ = self.bundle("--stream-id", "otad-rootfs-2", "--bucket", "b")
        with open(os.path.join(out, "ota-update.json")) as f:
            req = json.load(f)
        with open(os.path.join(out, "create-stream.json")) as f:
            stream_req = json.load(f)
        ota_request.validate("CreateOTAUpdate", req)
        ota_request.validate("CreateStream", stream_req)
        self.assertEqual([f["fileLocation"]["stream"] for f in req["files"]],
                         [{"streamId": "otad-rootfs-2", "fileId": i} for i in range(len(req["files"]))])
        self.assertEqual([f["fileId"] for f in stream_req["files"]], list(range(len(req["files"]))))

    def test_the_validator_is_not_vacuous(self):
        out, _ = self.bundle()
        with open(os.path.join(out, "ota-update.json")) as f:
            req = json.load(f)
        # botocore checks types, required and unknown keys and minimums
        # (not maximums): what a malformed request is made of.
        bad = json.loads(json.dumps(req))
        bad["files"][0]["fileType"] = "0"
        with self.assertRaisesRegex(ota_request.RequestError, "fileType"):
            ota_request.validate("CreateOTAUpdate", bad)
        bad = json.loads(json.dumps(req))
        bad["files"][0]["fileLocation"]["s3Location"]["Key"] = "x"
        with self.assertRaisesRegex(ota_request.RequestError, 'Unknown parameter.*"Key"'):
            ota_request.validate("CreateOTAUpdate", bad)
        bad = json.loads(json.dumps(req))
        bad["targets"] = []
        with self.assertRaisesRegex(ota_request.RequestError, "targets"):
            ota_request.validate("CreateOTAUpdate", bad)
        bad = json.loads(json.dumps(req))
        del bad["roleArn"]
        with self.assertRaisesRegex(ota_request.RequestError, "roleArn"):
            ota_request.validate("CreateOTAUpdate", bad)

    # ---- bad inputs ----------------------------------------------------

    def test_image_bigger_than_the_format_allows(self):
        sparse = os.path.join(self.tmp, "huge.img")
        with open(sparse, "wb") as f:
            f.truncate((1 << 40) + 1)
        try:
            _, p = self.bundle(image=sparse, check=False)
        finally:
            os.unlink(sparse)
        self.refused(p, "the bundle format allows at most 1099511627776")

    def test_unreadable_key(self):
        _, p = self.bundle(key=os.path.join(self.tmp, "missing.key"), check=False)
        self.refused(p, "cannot read key %s: No such file or directory" % os.path.join(self.tmp, "missing.key"))
        _, p = self.bundle(key=self.cert, check=False)
        self.refused(p, "is not a PEM private key")

    def test_key_and_certificate_that_do_not_match(self):
        _, p = self.bundle(key=self.other_key, check=False)
        self.refused(p, "key %s does not match certificate %s" % (self.other_key, self.cert))

    def test_output_directory_not_empty(self):
        out = tempfile.mkdtemp(prefix="full-", dir=self.tmp)
        open(os.path.join(out, "old.manifest"), "w").close()
        _, p = self.bundle(out=out, check=False)
        self.refused(p, "output directory %s is not empty (it holds old.manifest)" % out)

    def test_more_parts_than_a_stream_holds(self):
        _, p = self.bundle("--part-size", "4096", check=False)
        self.refused(p, "an AWS IoT stream holds 50 files (the manifest and 49 parts)")
        _, p = self.bundle("--part-size", str(24 * MIB + 1), check=False)
        self.refused(p, "--part-size 25165825 is not 1..25165824 bytes")

    def test_bad_version_and_missing_options(self):
        _, p = self.bundle(version="2.0 beta", check=False)
        self.refused(p, "--version 2.0 beta is not 1-128 characters")
        p = subprocess.run([OTAD, "bundle", "create", self.image, self.tmp], capture_output=True, text=True)
        self.refused(p, "create needs --key, --cert, --version and --compatible")

    # ---- inspect and verify --------------------------------------------

    def test_inspect(self):
        out, _ = self.bundle("--part-size", str(MIB))
        p = subprocess.run([OTAD, "bundle", "inspect", "--json", out], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        m = json.loads(p.stdout)
        self.assertEqual((m["compatible"], m["version"], m["image"]["size"]), ("test-board", "2.0.0", 6 * MIB))
        self.assertEqual(sum(part["size"] for part in m["parts"]), m["payload"]["size"])
        p = subprocess.run([OTAD, "bundle", "inspect", os.path.join(out, "bundle-2.0.0.manifest")],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"Payload: +zchunk, \d+ bytes \(\d+\.\d % of the image\)")
        p = subprocess.run([OTAD, "bundle", "inspect", self.image], capture_output=True, text=True)
        self.refused(p, "rootfs.img is larger than a manifest can be (65536 bytes)")
        p = subprocess.run([OTAD, "bundle", "inspect", self.cert], capture_output=True, text=True)
        self.refused(p, "signer.crt: manifest is not JSON")

    # ---- --previous --------------------------------------------------------

    def payload_of(self, out, name):
        with open(os.path.join(out, name + ".manifest")) as f:
            m = json.load(f)
        path = os.path.join(out, "payload.zck")
        with open(path, "wb") as p:
            for part in m["parts"]:
                with open(os.path.join(out, part["file"]), "rb") as f:
                    p.write(f.read())
        return m, path

    def test_previous_counts_the_new_chunks(self):
        with open(self.image, "rb") as f:
            old = f.read()
        # 8 KiB inserted (a file grew), 4 KB changed (a file rewritten).
        new = bytearray(old[:2 * MIB] + os.urandom(8192) + old[2 * MIB:])
        new[4 * MIB:4 * MIB + 4000] = os.urandom(4000)
        image = os.path.join(self.tmp, "rootfs-new.img")
        with open(image, "wb") as f:
            f.write(new)
        old_out, _ = self.bundle("--part-size", str(MIB), version="1.0.0")
        out, p = self.bundle("--previous", old_out, image=image, version="1.1.0")
        line = [l for l in p.stdout.splitlines() if l.startswith("  previous  ")]
        self.assertEqual(len(line), 1, p.stdout)
        m, payload = self.payload_of(out, "bundle-1.1.0")

        q = subprocess.run([OTAD, "bundle", "inspect", "--json", "--previous",
                            os.path.join(old_out, "bundle-1.0.0.manifest"), out],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(q.returncode, 0, q.stderr)
        prev = json.loads(q.stdout)["previous"]
        self.assertEqual(prev["version"], "1.0.0")
        self.assertTrue(prev["same_chunking"])
        self.assertEqual(prev["chunks"], m["payload"]["chunk_count"])
        self.assertEqual(prev["new_chunks"] + prev["reused_chunks"], prev["chunks"])
        self.assertGreaterEqual(prev["new_chunks"], 2)   # two edits, two places
        self.assertLessEqual(prev["new_chunks"], 8)
        self.assertEqual(prev["new_image_bytes"] + prev["reused_image_bytes"], len(new))
        self.assertIn("from 1.0.0: %d of %d chunks new" % (prev["new_chunks"], prev["chunks"]), line[0])

        # zchunk's own tool on the same pair says the same: what it would
        # download is the new chunks plus the header, which otad fetches
        # before it plans (both bundles at the same zstd level, so equal
        # chunks compress to equal bytes).
        if shutil.which("zck_delta_size"):
            _, old_payload = self.payload_of(old_out, "bundle-1.0.0")
            z = subprocess.run(["zck_delta_size", old_payload, payload], capture_output=True, text=True, check=True)
            want = "Would download %d of %d bytes" % (prev["fetch_payload_bytes"] + m["payload"]["header_size"],
                                                      m["payload"]["size"])
            self.assertIn(want, z.stdout)

        # Human output of inspect, and the same image again: nothing new.
        q = subprocess.run([OTAD, "bundle", "inspect", "--previous", old_out, out], capture_output=True, text=True)
        self.assertIn("Previous:     from 1.0.0: %d of" % prev["new_chunks"], q.stdout)
        _, p = self.bundle("--previous", old_out, version="1.0.1")
        self.assertIn("from 1.0.0: 0 of ", p.stdout)
        self.assertIn("fetches 0.0 MB of the payload (0.0 %)", p.stdout)

    def test_previous_that_is_not_a_bundle(self):
        out = os.path.join(self.tmp, "never")
        _, p = self.bundle("--previous", os.path.join(self.tmp, "nowhere"), out=out, check=False)
        self.refused(p, "cannot read %s" % os.path.join(self.tmp, "nowhere"))
        self.assertFalse(os.path.exists(out), "refused before anything was written")
        # A bundle directory whose parts are gone: the header is unreadable.
        old_out, _ = self.bundle(version="1.0.0")
        for name in os.listdir(old_out):
            if ".payload." in name and not name.endswith(".sig"):
                os.unlink(os.path.join(old_out, name))
        _, p = self.bundle("--previous", old_out, out=out, check=False)
        self.refused(p, "cannot read part")
        self.assertFalse(os.path.exists(out))

    def test_verify(self):
        out, _ = self.bundle("--part-size", str(MIB))
        p = subprocess.run([OTAD, "bundle", "verify", "--cert", self.cert, out], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("verified", p.stdout)

        p = subprocess.run([OTAD, "bundle", "verify", "--cert", self.other_cert, out], capture_output=True, text=True)
        self.refused(p, "signature mismatch")

        part = os.path.join(out, "bundle-2.0.0.payload.01")
        with open(part, "r+b") as f:
            f.seek(1000)
            b = f.read(1)
            f.seek(1000)
            f.write(bytes([b[0] ^ 1]))
        p = subprocess.run([OTAD, "bundle", "verify", "--cert", self.cert, out], capture_output=True, text=True)
        self.refused(p, "bundle-2.0.0.payload.01: signature mismatch")

        out2, _ = self.bundle("--part-size", str(MIB))
        manifest = os.path.join(out2, "bundle-2.0.0.manifest")
        with open(manifest) as f:
            text = f.read()
        with open(manifest, "w") as f:
            f.write(text.replace('"test-board"', '"othr-board"'))
        p = subprocess.run([OTAD, "bundle", "verify", "--cert", self.cert, out2], capture_output=True, text=True)
        self.refused(p, "bundle-2.0.0.manifest: signature mismatch")


class BundleThroughStandin(unittest.TestCase):
    """ota-update.json to a queued job, and the job's files fetched back."""

    @classmethod
    def setUpClass(cls):
        cls.stack = harness.Stack(things=["bundle-thing"])
        cls.stack.__enter__()
        cls.tmp = os.path.join(cls.stack.workdir, "bundles")
        os.makedirs(cls.tmp)
        cls.key, cls.cert = make_signer(cls.tmp, "signer")
        cls.image = os.path.join(cls.tmp, "rootfs.img")
        make_image(cls.image, 5 * MIB, 2)

    @classmethod
    def tearDownClass(cls):
        cls.stack.__exit__(None, None, None)

    def create(self, out, *args):
        argv = [OTAD, "bundle", "create", "--key", self.key, "--cert", self.cert, "--version", "3.1.0",
                "--compatible", "test-board", "--part-size", str(MIB), "--bucket", "standin",
                "--target", "arn:aws:iot:local:000000000000:thing/bundle-thing",
                "--role-arn", "arn:aws:iam::000000000000:role/ota", *args, self.image, out]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(os.path.join(out, "ota-update.json")) as f:
            return json.load(f)

    def check_entries(self, doc, req, out, stream_ids):
        files = doc["afr_ota"]["files"]
        self.assertEqual(len(files), len(req["files"]))
        for n, (entry, f) in enumerate(zip(files, req["files"])):
            with open(os.path.join(out, f["fileName"]), "rb") as data:
                size = len(data.read())
            self.assertEqual(entry["filepath"], f["fileName"])
            self.assertEqual(entry["fileid"], stream_ids[n])
            self.assertEqual(entry["filesize"], size)
            self.assertEqual(entry["certfile"], "signer.crt")
            self.assertEqual(entry["fileType"], 0)
            self.assertEqual(entry["sig-sha256-ecdsa"], f["codeSigning"]["customCodeSigning"]["signature"]["inlineDocument"])
        return files

    def fetch_all(self, doc, files, dest):
        config = self.stack.write_otad_config("bundle-thing", {"ota": {"block_size": 32768, "window": 4,
                                                                       "max_requests_per_second": 100}})
        for entry in files:
            out = os.path.join(dest, entry["filepath"])
            p = subprocess.run([FETCH, "-c", config, "--stream", doc["afr_ota"]["streamname"],
                                "--file-id", str(entry["fileid"]), "--size", str(entry["filesize"]),
                                "--out", out, "--state", out + ".state", "--job-id", "AFR_OTA-x",
                                "--signature", entry["sig-sha256-ecdsa"]],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_s3_files_over_mqtt(self):
        if not os.access(FETCH, os.X_OK):
            self.skipTest("%s not built" % FETCH)
        out = os.path.join(self.tmp, "s3")
        req = self.create(out, "--ota-update-id", "bundle-s3")
        info = self.stack.service.create_ota_update(req, out)
        self.assertEqual(info["job_id"], "AFR_OTA-bundle-s3")
        self.assertEqual(info["things"], ["bundle-thing"])
        doc = self.stack.service.job_document("bundle-thing", "AFR_OTA-bundle-s3")
        self.assertTrue(doc["afr_ota"]["streamname"].startswith("AFR_OTA-"))
        files = self.check_entries(doc, req, out, list(range(len(req["files"]))))
        # The manifest first, then the parts in payload order.
        self.assertTrue(files[0]["filepath"].endswith(".manifest"))
        dest = os.path.join(self.tmp, "s3-fetched")
        os.makedirs(dest)
        self.fetch_all(doc, files, dest)
        for entry in files:
            with open(os.path.join(dest, entry["filepath"]), "rb") as a, \
                    open(os.path.join(out, entry["filepath"]), "rb") as b:
                self.assertEqual(a.read(), b.read(), entry["filepath"])
            shutil.copy(os.path.join(out, entry["filepath"] + ".sig"), dest)
        p = subprocess.run([OTAD, "bundle", "verify", "--cert", self.cert, dest], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)

    def test_stream_files_need_the_stream_first(self):
        out = os.path.join(self.tmp, "stream")
        req = self.create(out, "--stream-id", "otad-bundle-stream", "--ota-update-id", "bundle-stream")
        with self.assertRaisesRegex(ota_request.RequestError, "ResourceNotFound"):
            self.stack.service.create_ota_update(req, out)
        with open(os.path.join(out, "create-stream.json")) as f:
            self.stack.service.create_stream_request(json.load(f), out)
        self.stack.service.create_ota_update(req, out)
        doc = self.stack.service.job_document("bundle-thing", "AFR_OTA-bundle-stream")
        self.assertEqual(doc["afr_ota"]["streamname"], "otad-bundle-stream")
        self.check_entries(doc, req, out, list(range(len(req["files"]))))

    def test_s3_files_over_https(self):
        out = os.path.join(self.tmp, "https")
        req = self.create(out, "--protocol", "HTTP", "--ota-update-id", "bundle-https")
        self.stack.service.create_ota_update(req, out)
        doc = self.stack.service.job_document("bundle-thing", "AFR_OTA-bundle-https")
        self.assertEqual(doc["afr_ota"]["protocols"], ["HTTP"])
        files = self.check_entries(doc, req, out, list(range(len(req["files"]))))
        ctx = ssl.create_default_context(cafile=self.stack.pki.ca_cert)
        for entry in files:
            self.assertEqual(entry["auth_scheme"], "aws.s3.presigned")
            with urllib.request.urlopen(entry["update_data_url"], context=ctx) as r, \
                    open(os.path.join(out, entry["filepath"]), "rb") as b:
                self.assertEqual(r.read(), b.read())

    def test_a_request_aws_would_refuse_queues_nothing(self):
        out = os.path.join(self.tmp, "bad")
        req = self.create(out, "--ota-update-id", "bundle-bad")
        req["files"][1]["fileLocation"]["s3Location"]["key"] = "no-such-part"
        with self.assertRaisesRegex(ota_request.RequestError, "NoSuchKey"):
            self.stack.service.create_ota_update(req, out)
        req["files"][1]["fileLocation"]["s3Location"]["key"] = "../../etc/passwd"
        with self.assertRaisesRegex(ota_request.RequestError, "leaves the bucket"):
            self.stack.service.create_ota_update(req, out)
        self.assertIsNone(self.stack.service.job_status("bundle-thing", "AFR_OTA-bundle-bad"))


if __name__ == "__main__":
    unittest.main()
