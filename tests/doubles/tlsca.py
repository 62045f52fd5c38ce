#!/usr/bin/python3
"""Test-time TLS certificate authority helper for the crmpay test suite.

crmpay talks to payment gateways over HTTPS and must verify the gateway's
certificate.  In tests the "gateway" is a local double (see stripe_double.py)
listening on 127.0.0.1, so we need certificates that a client can be told to
trust explicitly.  This module creates, with the ``openssl`` command-line tool:

* a throw-away CA (EC P-256 key + self-signed certificate, CN "crmpay test CA");
* a server key + certificate signed by that CA, with
  ``subjectAltName = DNS:localhost, IP:127.0.0.1`` and serverAuth usage,
  valid from now for a few days;
* a second, unrelated CA ("crmpay wrong CA") so tests can prove that a client
  configured with the wrong CA refuses the server.

Everything is written into the given directory; files are made world-readable
(mode 0644; the directory gets o+rx added) because the PostgreSQL server runs
as the ``postgres`` OS user and has to read ``ca_cert``.  The keys are test
keys only and must never be used for anything else.

Python use::

    from tests.doubles.tlsca import make_ca_and_server_cert
    paths = make_ca_and_server_cert("/tmp/x")
    # {"ca_cert": ..., "server_cert": ..., "server_key": ..., "wrong_ca_cert": ...}

Command line (prints the same dict as JSON)::

    /usr/bin/python3 tests/doubles/tlsca.py DIR

Only the standard library and the ``openssl`` CLI are used.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

# Certificates are short-lived on purpose: they are regenerated for every run.
VALID_DAYS = 7

CA_CN = "crmpay test CA"
WRONG_CA_CN = "crmpay wrong CA"
SERVER_CN = "localhost"

# A minimal, self-contained OpenSSL configuration.  Using our own file (instead
# of the system openssl.cnf) keeps the output identical on every machine and
# avoids "extension already defined" clashes between -addext and the system
# defaults.  Extensions follow what strict verifiers (Python 3.13's
# VERIFY_X509_STRICT, recent OpenSSL/libcurl) expect: CA certs carry
# basicConstraints CA:TRUE + keyCertSign + SKI; the leaf carries SAN,
# serverAuth EKU, SKI and AKI.
_OPENSSL_CNF = """\
[ req ]
distinguished_name = req_dn
prompt             = no
utf8               = yes
string_mask        = utf8only

[ req_dn ]
CN = placeholder

[ v3_ca ]
basicConstraints       = critical, CA:TRUE
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash

[ v3_server ]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature, keyEncipherment
extendedKeyUsage       = serverAuth
subjectAltName         = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
"""


def _openssl():
    """Return the path of the openssl binary or raise a clear error."""
    exe = shutil.which("openssl") or "/usr/bin/openssl"
    if not os.path.exists(exe):
        raise RuntimeError("the 'openssl' command-line tool is required")
    return exe


def _run(args):
    """Run openssl quietly; raise with its stderr if it fails."""
    proc = subprocess.run(
        [_openssl()] + args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Keep openssl from reading a user's OPENSSL_CONF or writing ~/.rnd.
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RANDFILE": "/dev/null"},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            "openssl %s failed (rc=%d): %s"
            % (" ".join(args[:2]), proc.returncode, proc.stderr.decode(errors="replace").strip())
        )


def _make_self_signed_ca(cnf, key_path, cert_path, cn):
    """Create an EC P-256 key and a self-signed CA certificate for it."""
    _run([
        "req", "-x509", "-new",
        "-config", cnf, "-extensions", "v3_ca",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key_path,
        "-out", cert_path,
        "-sha256", "-days", str(VALID_DAYS),
        "-subj", "/CN=" + cn,
        "-set_serial", "0x" + secrets.token_hex(16),
    ])


def make_ca_and_server_cert(directory):
    """Create a test CA, a server cert signed by it, and an unrelated CA.

    Returns a dict of absolute paths with the keys ``ca_cert``,
    ``server_cert``, ``server_key`` and ``wrong_ca_cert``.
    """
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    # Let other OS users (postgres) traverse the directory; never remove bits.
    try:
        mode = os.stat(directory).st_mode & 0o7777
        if mode & 0o055 != 0o055:
            os.chmod(directory, mode | 0o055)
    except PermissionError:
        pass  # not our directory; the caller is responsible for its mode

    paths = {
        "ca_key": os.path.join(directory, "ca.key"),
        "ca_cert": os.path.join(directory, "ca.crt"),
        "server_key": os.path.join(directory, "server.key"),
        "server_csr": os.path.join(directory, "server.csr"),
        "server_cert": os.path.join(directory, "server.crt"),
        "wrong_ca_key": os.path.join(directory, "wrong_ca.key"),
        "wrong_ca_cert": os.path.join(directory, "wrong_ca.crt"),
    }

    # The config file lives in a private temp dir and is removed afterwards.
    with tempfile.TemporaryDirectory(prefix="crmpay-tlsca-") as tmp:
        cnf = os.path.join(tmp, "openssl.cnf")
        with open(cnf, "w", encoding="ascii") as fh:
            fh.write(_OPENSSL_CNF)

        # 1. The CA that tests hand to crmpay as "the gateway's CA".
        _make_self_signed_ca(cnf, paths["ca_key"], paths["ca_cert"], CA_CN)

        # 2. Server key + CSR, then sign it with the CA.
        _run([
            "req", "-new", "-config", cnf,
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", paths["server_key"],
            "-out", paths["server_csr"],
            "-subj", "/CN=" + SERVER_CN,
        ])
        _run([
            "x509", "-req",
            "-in", paths["server_csr"],
            "-CA", paths["ca_cert"], "-CAkey", paths["ca_key"],
            "-set_serial", "0x" + secrets.token_hex(16),
            "-out", paths["server_cert"],
            "-sha256", "-days", str(VALID_DAYS),
            "-extfile", cnf, "-extensions", "v3_server",
        ])

        # 3. An unrelated CA: trusting it must NOT make the server acceptable.
        _make_self_signed_ca(cnf, paths["wrong_ca_key"], paths["wrong_ca_cert"], WRONG_CA_CN)

    try:
        os.unlink(paths["server_csr"])
    except OSError:
        pass

    # World-readable: the postgres OS user reads ca_cert, and the double may
    # run as yet another user.  These are throw-away test keys.
    for name in ("ca_key", "ca_cert", "server_key", "server_cert", "wrong_ca_key", "wrong_ca_cert"):
        os.chmod(paths[name], 0o644)

    return {
        "ca_cert": paths["ca_cert"],
        "server_cert": paths["server_cert"],
        "server_key": paths["server_key"],
        "wrong_ca_cert": paths["wrong_ca_cert"],
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        sys.stderr.write("usage: tlsca.py DIR\n")
        return 2
    print(json.dumps(make_ca_and_server_cert(argv[0]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
