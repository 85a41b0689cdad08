#!/usr/bin/python3
"""Test PKI for the local AWS IoT stand-in, made with the openssl CLI.

Owns: one directory holding a CA, the broker's server certificate, one client
certificate per thing (CN = thing name, like an AWS IoT thing certificate), the
`service` client certificate the stand-in uses, a rogue certificate from a
foreign CA, two ECDSA P-256 code-signing identities (trusted, untrusted), and
on request expired client certificates.
Never talks to the network.
"""

import base64
import tempfile
import os
import subprocess

SERVICE = "service"
EC_P256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
DAYS = "30"


def _openssl(args, cwd):
    subprocess.run(["openssl"] + args, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Pki:
    """Paths of the generated material; create() makes it."""

    def __init__(self, directory):
        self.dir = directory

    def path(self, name):
        return os.path.join(self.dir, name)

    @property
    def ca_cert(self):
        return self.path("ca.crt")

    @property
    def server_cert(self):
        return self.path("server.crt")

    @property
    def server_key(self):
        return self.path("server.key")

    def client_cert(self, name):
        return self.path(name + ".crt")

    def client_key(self, name):
        return self.path(name + ".key")

    @property
    def signer_cert(self):
        return self.path("signer.crt")

    @property
    def signer_key(self):
        return self.path("signer.key")

    @property
    def untrusted_signer_cert(self):
        return self.path("untrusted-signer.crt")

    @property
    def untrusted_signer_key(self):
        return self.path("untrusted-signer.key")

    @property
    def rogue_cert(self):
        return self.path("rogue.crt")

    @property
    def rogue_key(self):
        return self.path("rogue.key")

    @classmethod
    def create(cls, directory, things):
        os.makedirs(directory, exist_ok=True)
        # mosquitto, started as root, drops to user 'mosquitto' and then
        # reads the CA, its certificate and key: the directory must be
        # traversable and those files readable by it.
        os.chmod(directory, 0o755)
        pki = cls(directory)
        d = directory
        _openssl(["req", "-x509"] + EC_P256 + [
            "-keyout", "ca.key", "-out", "ca.crt", "-days", DAYS,
            "-subj", "/CN=otad-standin-CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)
        # 10.0.2.2: the host's loopback as a QEMU guest on user networking
        # reaches it (tests/system), so that the guest verifies the name too.
        pki._issue("server", "localhost",
                   "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.2.2\n"
                   "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        for name in list(things) + [SERVICE]:
            pki.add_client(name)
        # Same CN as a real thing, but signed by a CA the broker doesn't know.
        first = things[0] if things else "thing"
        _openssl(["req", "-x509"] + EC_P256 + [
            "-keyout", "rogue.key", "-out", "rogue.crt", "-days", DAYS,
            "-subj", "/CN=" + first], d)
        for stem in ("signer", "untrusted-signer"):
            # AWS Signer/ACM accept a code-signing cert only with this
            # keyUsage and EKU (protocol.md §5).
            _openssl(["req", "-x509"] + EC_P256 + [
                "-keyout", stem + ".key", "-out", stem + ".crt", "-days", DAYS,
                "-subj", "/CN=otad-standin-" + stem,
                "-addext", "keyUsage=critical,digitalSignature",
                "-addext", "extendedKeyUsage=codeSigning"], d)
        for name in os.listdir(d):
            if name.endswith((".csr", ".ext", ".srl")):
                os.unlink(os.path.join(d, name))
        for name in ("ca.crt", "server.crt", "server.key"):
            os.chmod(pki.path(name), 0o644)
        os.chmod(pki.path("ca.key"), 0o600)
        return pki

    def add_client(self, name, days=DAYS):
        """Issues a client certificate with CN=name; its key is mode 0600
        because otad refuses group/world-readable private keys. days=-1
        makes one that expired a day before it was issued."""
        self._issue(name, name, "extendedKeyUsage=clientAuth\n"
                                "basicConstraints=CA:FALSE\n", days)
        os.chmod(self.client_key(name), 0o600)
        os.chmod(self.client_cert(name), 0o644)

    def add_expired_client(self, name):
        """A client certificate of the CA for CN=name whose notAfter lies a
        day in the past: the broker refuses it with the TLS alert
        "certificate expired". Returns (cert, key)."""
        self.add_client(name, days="-1")
        return self.client_cert(name), self.client_key(name)

    def _issue(self, stem, cn, extensions, days=DAYS):
        with open(self.path(stem + ".ext"), "w") as f:
            f.write(extensions)
        _openssl(["req"] + EC_P256 + ["-keyout", stem + ".key",
                  "-out", stem + ".csr", "-subj", "/CN=" + cn], self.dir)
        _openssl(["x509", "-req", "-in", stem + ".csr", "-CA", "ca.crt",
                  "-CAkey", "ca.key", "-CAcreateserial", "-out", stem + ".crt",
                  "-days", str(days), "-extfile", stem + ".ext"], self.dir)
        os.unlink(self.path(stem + ".csr"))
        os.unlink(self.path(stem + ".ext"))


def sign_bytes(data, key_file):
    """Base64 of the DER ECDSA signature over SHA-256(data), exactly what
    `openssl dgst -sha256 -sign key | base64` gives and what goes into
    `sig-sha256-ecdsa` (protocol.md §5)."""
    der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key_file],
                         input=data, check=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE).stdout
    return base64.b64encode(der).decode()


def sign_file(path, key_file):
    with open(path, "rb") as f:
        return sign_bytes(f.read(), key_file)


def verify_bytes(data, signature_b64, cert_file):
    """True when signature_b64 verifies over data with cert_file's public key."""
    pub = subprocess.run(["openssl", "x509", "-in", cert_file, "-pubkey", "-noout"],
                         check=True, stdout=subprocess.PIPE).stdout
    with tempfile.NamedTemporaryFile() as k, tempfile.NamedTemporaryFile() as s:
        k.write(pub)
        k.flush()
        s.write(base64.b64decode(signature_b64))
        s.flush()
        r = subprocess.run(["openssl", "dgst", "-sha256", "-verify", k.name,
                            "-signature", s.name], input=data,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0
